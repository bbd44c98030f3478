"""The exact faster convolutions (pipeline.models.convs) against nn.Conv2d: outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import build_classifier, convs
from pipeline.models.convs import AtrousConv2d, DilatedDepthwiseConv2d, exact_faster, reading_taps
from pipeline.models.segmenter import build_segmenter


def outputs_and_grads(conv: nn.Conv2d, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    conv.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout in every call
    y = conv(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a gradient that differs per position
    return [y.detach(), x.grad, *(p.grad for p in conv.parameters())]


def assert_same_as_conv2d(conv: nn.Conv2d, x: torch.Tensor, rtol: float = 1e-5) -> None:
    reference = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None)
    reference.load_state_dict(conv.state_dict())
    for got, want in zip(outputs_and_grads(conv, x), outputs_and_grads(reference, x), strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= rtol * want.abs().max()


def test_reading_taps():
    assert reading_taps(8, 3, 12, 12) == (1, 2)  # rate 12 on an 8-wide map: only the centre reads it
    assert reading_taps(8, 3, 6, 6) == (0, 3)
    assert reading_taps(16, 3, 18, 18) == (1, 2)
    assert reading_taps(16, 3, 12, 12) == (0, 3)
    assert reading_taps(5, 3, 1, 0) == (0, 3)


@pytest.mark.parametrize("size, rate", [((8, 8), 12), ((8, 8), 6), ((8, 19), 18), ((5, 5), 4), ((3, 7), 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_atrous_conv_equals_conv2d(size, rate, channels_last):
    """Outputs and gradients, with the taps left out and, where a dilated kernel remains, the written-out
    backward (rate 6 on 8 x 8, 18 on the 19 columns, 4 on 5 x 5, 3 on 3 x 7)."""
    torch.manual_seed(0)
    conv = AtrousConv2d(6, 4, 3, padding=rate, dilation=rate, bias=True)
    x = torch.randn(2, 6, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_as_conv2d(conv, x)


@pytest.mark.parametrize("kernel, padding, dilation", [((3, 5), (2, 4), (2, 2)), ((3, 3), (1, 3), (1, 3)),
                                                        ((3, 3), (0, 0), (2, 2))])
def test_dense_weight_grad_equals_conv2d(kernel, padding, dilation):
    """The per-tap weight gradient for kernels, paddings and dilations that differ per dimension."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 9, 11), torch.randn(4, 5, *kernel)
    grad = torch.randn_like(F.conv2d(x, w, None, 1, padding, dilation))
    want = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], list(padding), list(dilation), False,
                                               [0, 0], 1, [False, True, False])[1]
    got = convs._dense_weight_grad(x, grad, w.shape, padding, dilation)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_atrous_conv_leaves_out_the_taps_that_read_padding():
    conv = AtrousConv2d(3, 2, 3, padding=12, dilation=12, bias=False)
    with torch.no_grad():
        conv.weight.fill_(float("nan"))
        conv.weight[:, :, 1, 1] = 1.0
    x = torch.randn(1, 3, 8, 8)
    assert torch.isfinite(conv(x)).all()  # the full convolution would multiply the NaNs by the padding
    assert torch.allclose(conv(x), x.sum(1, keepdim=True).expand(1, 2, 8, 8), atol=1e-5)
    assert torch.isnan(F.conv2d(x, conv.weight, None, 1, 12, 12)).any()
    assert not torch.isfinite(conv(torch.randn(1, 3, 13, 13))).all()  # 13 > 12: the off-centre taps read it


@pytest.mark.parametrize("kernel, dilation, size", [(5, 2, (8, 8)), (3, 2, (9, 6)), (5, 3, (7, 11)), (3, 1, (6, 6))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_backward_equals_conv2d(kernel, dilation, size, channels_last, monkeypatch):
    monkeypatch.setattr(convs, "CACHE_FLOATS", 100)  # several batch groups in the weight gradient
    torch.manual_seed(0)
    conv = DilatedDepthwiseConv2d(8, 8, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=8,
                                  bias=True)
    x = torch.randn(3, 8, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_as_conv2d(conv, x)


@pytest.mark.parametrize("conv", [DilatedDepthwiseConv2d(4, 4, 3, padding=2, dilation=2, groups=4),
                                  AtrousConv2d(4, 4, 3, padding=2, dilation=2)])
def test_backward_is_written_out_only_where_it_is_needed(conv, monkeypatch):
    calls = []
    monkeypatch.setattr(convs._StrideOneConv, "apply", lambda *a: calls.append(a) or F.conv2d(a[0], a[1], a[2], 1,
                                                                                               *a[3:]))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        conv(x)
    assert not calls
    conv(x)
    assert len(calls) == 1
    conv(torch.randn(1, 4, 2, 2))  # rate 2 on 2 x 2: only the centre tap reads it, a 1 x 1 convolution
    assert len(calls) == 1 + isinstance(conv, DilatedDepthwiseConv2d)


def test_exact_faster_swaps_only_what_it_computes_the_same():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),  # dilated depthwise
                        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # dilated dense
                        nn.Conv2d(4, 4, 3, padding=1),  # plain
                        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4))  # strided
    keys = net.state_dict().keys()
    weights = [m.weight for m in net]
    exact_faster(net)
    assert [type(m) for m in net] == [DilatedDepthwiseConv2d, AtrousConv2d, nn.Conv2d, nn.Conv2d]
    assert net.state_dict().keys() == keys and all(m.weight is w for m, w in zip(net, weights, strict=True))


def _grads_match(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> None:
    assert (got[0] - want[0]).abs().max() <= 1e-5 * want[0].abs().max()
    # all gradients on one scale: some (a BatchNorm bias before another BatchNorm) are 0 up to rounding
    got, want = (torch.cat([g.flatten() for g in grads[1:] if g is not None]) for grads in (got, want))
    assert got.numel() == want.numel() and (got - want).abs().max() <= 1e-4 * want.abs().max()


def _swapped(net: nn.Module) -> int:
    return sum(isinstance(m, (AtrousConv2d, DilatedDepthwiseConv2d)) for m in net.modules())


def test_the_classifier_with_fast_cpu_convs_trains_as_with_pytorchs_own():
    """classifier.fast_cpu_convs: the same network built without them (plain nn.Conv2d) gives the same scores
    and gradients in a training step on CPU."""
    torch.manual_seed(0)
    fast, _ = build_classifier("cam", "tf_efficientnet_lite0", "none", 3)
    plain, _ = build_classifier("cam", "tf_efficientnet_lite0", "none", 3, fast_cpu_convs=False)
    assert _swapped(fast) > 0 and _swapped(plain) == 0
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 64, 64)
    _grads_match(outputs_and_grads(fast.train(), x), outputs_and_grads(plain.train(), x))


def test_the_segmenter_with_fast_cpu_convs_trains_as_with_pytorchs_own():
    """segmenter.fast_cpu_convs, in the backbone and the ASPP head (rates 12 and 18 read only the centre of the
    4 x 4 map of a 64-pixel input)."""
    torch.manual_seed(0)
    fast, _ = build_segmenter("tf_efficientnet_lite0", "none", 3, 16, [6, 12, 18])
    plain, _ = build_segmenter("tf_efficientnet_lite0", "none", 3, 16, [6, 12, 18], fast_cpu_convs=False)
    assert sum(isinstance(m, AtrousConv2d) for m in fast.head.modules()) == 3 and _swapped(plain) == 0
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 64, 64)
    _grads_match(outputs_and_grads(fast.train(), x), outputs_and_grads(plain.train(), x))

"""Score-CAM and SS-CAM against a naive per-class, per-channel loop of the papers' formulas, and torchcam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps import get_map_method
from pipeline.maps.scorecam import increase_of_confidence
from pipeline.maps.stem_basis import StemBasis
from pipeline.models import Classifier, build_classifier

SIZE = (32, 32)
SHARES = {3: 2}  # TinyNet's channel -> the channel whose masked inputs (and SS-CAM noise) it shares


class TinyNet(Classifier):
    """conv (stride 1) -> ReLU -> conv (stride 2) -> ReLU -> GAP -> linear. In ``backbone`` (the second conv's
    output), channels 0 and 1 are constant (0.5 everywhere; dead after the ReLU), channel 3 is twice channel 2
    (the same normalised map, so the method forwards its mask once)."""

    def __init__(self, multilabel: bool | None = True, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Linear(16, num_classes)
        self.multilabel = bool(multilabel)
        with torch.no_grad():
            conv = self.backbone[2]
            conv.weight[:2] = 0
            conv.bias[:2] = torch.tensor([0.5, -1.0])
            conv.weight[3], conv.bias[3] = 2 * conv.weight[2], 2 * conv.bias[2]
            self.classifier.weight.mul_(4)  # confident enough that the masks move the probabilities
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x).mean(dim=(2, 3)))


class Generic(nn.Module):
    """A classifier's layers in a plain ``nn.Module``, outside ``pipeline.models.Classifier``: softmax."""

    def __init__(self, net: TinyNet):
        super().__init__()
        self.backbone, self.classifier = net.backbone, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    return TinyNet()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(3, 3, *SIZE)
    classes = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    return x, classes


def _activations(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    out = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: out.append(o))
    model(x)
    handle.remove()
    return out[0]


def _mask(acts: torch.Tensor, b: int, k: int) -> torch.Tensor | None:
    """H^k = s(U(A^k)) of image b, or None where it is undefined (constant channel)."""
    up = F.interpolate(acts[b:b + 1, k:k + 1], size=SIZE, mode="bilinear", align_corners=False)
    return None if up.max() == up.min() else (up - up.min()) / (up.max() - up.min())


def _baseline(x: torch.Tensor, baseline: float | str) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x) if baseline == "mean" else torch.full_like(x, baseline)


def _noise(acts, classes, variant: str, n: int, sigma: float, seed: int) -> dict[tuple[int, int, int], torch.Tensor]:
    """The noise of every (image, channel, sample) row, drawn in the order the method draws it with chunk=1:
    rows image-major over images with a requested class and the channels it forwards, then samples."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 1, *SIZE) if variant == "activation" else (1, 3, *SIZE)
    return {(b, k, i): sigma * torch.randn(shape, generator=gen)
            for b in range(acts.shape[0]) if classes[b].any()
            for k in range(acts.shape[1]) if _mask(acts, b, k) is not None and k not in SHARES
            for i in range(n)}


def naive_scorecam(model, x, classes, prob, layer="backbone", baseline=0.0, variant="activation", n=1,
                   sigma=0.0, seed=0) -> torch.Tensor:
    """The papers' formula one class and one channel at a time: a_k^c = mean_i p_c(M^k_i) - p_c(X_b),
    L^c = U(ReLU(sum_k a_k^c A^k)); constant channels skipped."""
    with torch.no_grad():
        acts = _activations(model, x, layer)
        noise = _noise(acts, classes, variant, n, sigma, seed) if sigma > 0 else {}
        out = torch.zeros((*classes.shape, *SIZE))
        for b, c in classes.nonzero().tolist():
            xi, xb = x[b:b + 1], _baseline(x, baseline)[b:b + 1]
            span = xi.max() - xi.min()
            cam = torch.zeros(acts.shape[-2:])
            for k in range(acts.shape[1]):
                h = _mask(acts, b, k)
                if h is None:
                    continue
                p = 0.0
                for i in range(n):
                    d = noise.get((b, SHARES.get(k, k), i), 0.0)
                    hi = h + d if variant == "activation" else h
                    masked = xi * hi + xb * (1 - hi) + (span * d if variant == "input" else 0.0)
                    p = p + prob(model(masked))[0, c]
                cam += (p / n - prob(model(xb))[0, c]) * acts[b, k]
            out[b, c] = F.interpolate(F.relu(cam)[None, None], size=SIZE, mode="bilinear", align_corners=False)[0, 0]
    return out


def softmax(scores: torch.Tensor) -> torch.Tensor:
    return scores.softmax(1)


@pytest.mark.parametrize("baseline", [0.0, "mean", -0.5])
def test_scorecam_matches_naive_loop(tiny, batch, baseline):
    x, classes = batch
    ours = get_map_method("scorecam")(tiny, x, classes, baseline=baseline)
    naive = naive_scorecam(tiny, x, classes, torch.sigmoid, baseline=baseline)
    assert (naive[classes].flatten(1).amax(1) > 0).sum() >= 3  # most maps survive the ReLU
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-4)


def test_chunks_and_one_set_of_masked_forwards_per_image(batch):
    x, classes = batch
    tiny = TinyNet()  # its own inference copy, made (with the hook below) by the first call, reused after
    maps, sizes = {}, []
    handle = tiny.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        for chunk in (1, 3, 10_000):
            sizes.clear()
            maps[chunk] = get_map_method("scorecam")(tiny, x, classes, chunk=chunk)
            # the images (for A), on the first call the first image through the model and its folded copy (the
            # fold's check), the constant baseline once, then the 13 distinct non-constant channels x the 2
            # images with classes, whatever the number of classes asked for
            head = [3, 1, 1, 1] if chunk == 1 else [3, 1]
            assert sizes[:len(head)] == head
            assert sum(sizes[len(head):]) == 26 and max(sizes[len(head):]) == min(chunk, 26)
    finally:
        handle.remove()
    torch.testing.assert_close(maps[1], maps[10_000], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[3], maps[10_000], atol=1e-6, rtol=1e-5)


def test_zero_for_other_classes_and_constant_channels_skipped(tiny, batch):
    x, classes = batch
    out = get_map_method("scorecam")(tiny, x, classes)
    assert out.shape == (3, 4, *SIZE) and out.dtype == torch.float32
    assert (out >= 0).all() and (out[~classes] == 0).all()
    _, alpha = increase_of_confidence(tiny, x, classes)
    assert (alpha[:, :, :2] == 0).all()  # constant channels (0.5, and dead): no weight
    assert alpha[:, :, 3].equal(alpha[:, :, 2])  # the same normalised map: the same weight
    assert (alpha[1] == 0).all() and (alpha[[0, 2], :, 2:] != 0).all()  # the image without classes is not scored


@pytest.mark.parametrize(("multilabel", "probability", "expected"), [
    (True, "auto", torch.sigmoid), (None, "auto", softmax), (False, "auto", softmax),
    (True, "softmax", softmax), (None, "sigmoid", torch.sigmoid)])
def test_probability_sigmoid_for_multilabel_softmax_otherwise(batch, multilabel, probability, expected):
    x, classes = batch
    model = TinyNet(multilabel) if multilabel is not None else Generic(TinyNet())  # None: not a Classifier
    ours = get_map_method("scorecam")(model, x, classes, probability=probability)
    torch.testing.assert_close(ours, naive_scorecam(model, x, classes, expected), atol=1e-5, rtol=1e-4)


def test_camnet_is_multilabel_and_interface():
    torch.manual_seed(0)
    net, _ = build_classifier("cam", "smallcnn", "none", 5)
    net.eval().requires_grad_(False)
    assert net.multilabel
    x = torch.randn(2, 3, *SIZE)
    classes = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    for name, kw in (("scorecam", {}), ("sscam", {"n": 2})):
        out = get_map_method(name)(net, x, classes, **kw)
        assert out.shape == (2, 5, *SIZE) and out.dtype == torch.float32
        assert (out >= 0).all() and (out[~classes] == 0).all() and out[classes].sum() > 0


@pytest.mark.parametrize("variant", ["activation", "input"])
def test_sscam_matches_naive_loop(tiny, batch, variant):
    x, classes = batch
    kw = {"variant": variant, "n": 3, "sigma": 0.3, "seed": 5}
    ours = get_map_method("sscam")(tiny, x, classes, chunk=1, **kw)
    torch.testing.assert_close(ours, naive_scorecam(tiny, x, classes, torch.sigmoid, **kw), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, get_map_method("scorecam")(tiny, x, classes))  # the noise matters


@pytest.mark.parametrize("variant", ["activation", "input"])
def test_sscam_without_noise_is_scorecam(tiny, batch, variant):
    x, classes = batch
    ours = get_map_method("sscam")(tiny, x, classes, variant=variant, n=3, sigma=0.0, baseline="mean")
    torch.testing.assert_close(ours, get_map_method("scorecam")(tiny, x, classes, baseline="mean"),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["activation", "input"])
def test_sscam_is_deterministic_given_the_seed(tiny, batch, variant):
    x, classes = batch
    run = [get_map_method("sscam")(tiny, x, classes, variant=variant, n=2, chunk=5, seed=s) for s in (3, 3, 4)]
    assert run[0].equal(run[1]) and not run[0].equal(run[2])


def test_peers_torchcam_scorecam_and_sscam(tiny, batch):
    """torchcam follows the paper's Algorithm 1: weights softmax_k(logit_c(X * H^k) - logit_c(X)), and it
    normalises A^k before upsampling it. On a layer at input resolution (no upsampling), softmax_k of our
    logit Increase of Confidence with baseline 0 (X * H^k, the logit of X_b cancels in the softmax) gives its
    maps. Its SSCAM's noise comes from the global RNG in another order than ours, so only sigma -> 0 compares
    (torchcam needs std > 0)."""
    from torchcam.methods import SSCAM, ScoreCAM

    x, _ = batch
    classes = torch.ones(3, 4, dtype=torch.bool)
    acts, alpha = increase_of_confidence(tiny, x, classes, layer="backbone.1", probability="logit", chunk=16)
    ours = F.relu(torch.einsum("bck,bkhw->bchw", alpha.softmax(-1), acts))
    for peer in (ScoreCAM(tiny, "backbone.1", batch_size=16, input_shape=x.shape[1:]),
                 SSCAM(tiny, "backbone.1", batch_size=16, num_samples=2, std=1e-9, input_shape=x.shape[1:])):
        with peer, torch.no_grad():
            for c in range(4):
                tiny(x)
                torch.testing.assert_close(peer(class_idx=c, normalized=False)[0], ours[:, c], atol=1e-5, rtol=1e-4)


class StemNet(Classifier):
    """A ResNet-like stem, 7 x 7 x 3 convolution (stride 2) + BatchNorm, then two stride-2 convolutions:
    ``backbone`` is 4 x 4 at 32 px, so its 18 basis maps are cheaper than the stem's 147 weights per output.
    ``reads_input``: the score also reads the input itself (past the first layer), as no CNN classifier
    does, so the stem basis must be refused."""

    multilabel = True

    def __init__(self, reads_input: bool = False):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.backbone = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Linear(16, 4)
        self.reads_input = reads_input
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-0.2, 0.2)
            self.stem[1].running_var.uniform_(0.5, 2.0)
            self.classifier.weight.mul_(4)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(self.backbone(self.stem(x)).mean(dim=(2, 3)))
        return scores + x.mean(dim=(1, 2, 3))[:, None] if self.reads_input else scores


@pytest.fixture()
def basis_calls(monkeypatch) -> list[int]:
    """The rows of every masked-forward chunk that goes through the stem basis."""
    calls: list[int] = []
    original = StemBasis.__call__

    def spy(self, b, k):
        calls.append(b.numel())
        return original(self, b, k)

    monkeypatch.setattr(StemBasis, "__call__", spy)
    return calls


@pytest.mark.parametrize("baseline", [0.0, "mean"])
def test_stem_basis_matches_naive_loop(batch, basis_calls, baseline):
    """stem(X_b + H^k * D) from the per-image basis gives the paper's maps, chunked or not."""
    x, classes = batch
    net = StemNet()
    naive = naive_scorecam(net, x, classes, torch.sigmoid, baseline=baseline)
    assert (naive[classes].flatten(1).amax(1) > 0).sum() >= 2
    for stem, chunk in (("auto", 64), ("basis", 5), ("conv", 64)):
        basis_calls.clear()
        ours = get_map_method("scorecam")(net, x, classes, baseline=baseline, chunk=chunk, stem=stem)
        torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-4)
        forwarded = sum(basis_calls) - 2  # the check's two rows
        assert (forwarded > 0) == (stem != "conv") and max(basis_calls, default=0) <= chunk


def test_stem_basis_only_where_it_applies_and_pays(tiny, batch, basis_calls):
    x, classes = batch
    get_map_method("scorecam")(tiny, x, classes)  # a 3 x 3 stem (27 weights), a 16 x 16 layer (258 terms)
    get_map_method("sscam")(StemNet(), x, classes, n=2, sigma=0.2)  # noise is not in the basis' span
    assert basis_calls == []
    reads = StemNet(reads_input=True)
    ours = get_map_method("scorecam")(reads, x, classes)  # the check fails: the plain masked forwards
    torch.testing.assert_close(ours, naive_scorecam(reads, x, classes, torch.sigmoid), atol=1e-5, rtol=1e-4)
    assert basis_calls == [2]
    with pytest.raises(ValueError, match="stem: basis"):
        get_map_method("scorecam")(reads, x, classes, stem="basis")

    class Scaled(StemNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(2 * x)  # the first convolution sees 2x, not the input itself

    with pytest.raises(ValueError, match="stem: basis"):
        get_map_method("scorecam")(Scaled(), x, classes, stem="basis")

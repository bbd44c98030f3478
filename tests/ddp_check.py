"""Run under ``torchrun --nproc_per_node 2 tests/ddp_check.py OUT.json``: the building blocks of
``pipeline/distributed.py`` against a single-process reference that rank 0 trains beside the DDP model.

Rank 0 writes to OUT.json, for smallcnn in float64 and float32 and EfficientNet-Lite0 (timm's
BatchNorm+activation layers) in float64, |a - b| / |a| over all the tensors together (a the reference):
- ``<net>/<dtype>/uneven``: the gradients when the global batch (5 samples) splits 3 + 2, with
  ``reduce_losses``' scale;
- ``<net>/<dtype>/grad``: the gradients of a batch of 8, 4 per process;
- ``<net>/<dtype>/sgd``: the parameters and BatchNorm buffers after 4 SGD steps more (in float32 float noise
  grows: where a pre-activation lies within float error of 0, the two ReLUs pass different gradients);
- ``val``, ``val_map_diff``: validation scores of ``shard`` + ``gather_rows`` against scores on the whole set.
In float64 the figures are bounded by the loss, which the classifier computes in float32 (about 1e-8).
After ``close()`` each rank writes the names of its threads that belong to gloo to ``OUT.rank<r>`` (none: the
process group is gone before the interpreter shuts down).
tests/test_distributed_ddp.py asserts on them.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from pipeline.distributed import DistContext, init_distributed
from pipeline.metrics import mean_average_precision
from pipeline.models import build_classifier
from pipeline.train import LossNet, predict_scores

NUM_CLASSES = 5


def batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 3, 32, 32, generator=g), (torch.rand(n, NUM_CLASSES, generator=g) > 0.5).float()


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a| over all the floating-point tensors together (per tensor, one whose values are all
    near 0, as a BatchNorm bias after a few steps, would turn float noise into a large ratio)."""
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys) ** 0.5
    return (diff / sum((a[k].double() ** 2).sum() for k in keys) ** 0.5).item()


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def check(ctx: DistContext, backbone: str, dtype: torch.dtype, sgd_steps: int) -> tuple[dict[str, float], nn.Module]:
    r, n = ctx.rank, ctx.world_size
    torch.manual_seed(0)
    net, _ = build_classifier("cam", backbone, "none", NUM_CLASSES)
    net = net.to(dtype)
    ref = copy.deepcopy(net)
    model = ctx.wrap(LossNet(net))
    results: dict[str, float] = {}

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(dtype), y.to(dtype)
        loss = sum(model(x[r::n], y[r::n]).values())
        _, scale = ctx.reduce_losses({"loss": loss}, len(x[r::n]))
        (loss * scale).backward()
        if ctx.is_main:
            sum(LossNet(ref)(x, y).values()).backward()

    step(*batch(0, 5))  # 3 + 2 samples
    results["uneven"] = rel(grads(ref), grads(net)) if ctx.is_main else 0.0
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref)]
    for opt in opts:
        opt.zero_grad()
    step(*batch(1, 8))
    results["grad"] = rel(grads(ref), grads(net)) if ctx.is_main else 0.0
    for s in range(sgd_steps):
        for opt in opts:
            opt.step()
            opt.zero_grad()
        step(*batch(s + 2, 16))
    if sgd_steps:
        results["sgd"] = rel(ref.state_dict(), net.state_dict()) if ctx.is_main else 0.0
    return results, net


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    results: dict[str, float] = {"world_size": ctx.world_size}
    for backbone, dtype, steps in (("smallcnn", torch.float64, 4), ("tf_efficientnet_lite0", torch.float64, 0),
                                   ("smallcnn", torch.float32, 4)):
        part, net = check(ctx, backbone, dtype, steps)
        results.update({f"{backbone}/{str(dtype).removeprefix('torch.')}/{k}": v for k, v in part.items()})

    val = TensorDataset(*batch(10, 11))  # 11 images: 6 + 5 on the two ranks
    local = predict_scores(net, Subset(val, ctx.shard(len(val))), ctx.device, 4)
    gathered = ctx.gather_rows(torch.from_numpy(local), len(val)).numpy()
    if ctx.is_main:
        whole = predict_scores(net, val, ctx.device, 4)
        targets = val.tensors[1].numpy()
        results["val"] = float(abs(gathered - whole).max())
        results["val_map_diff"] = abs(mean_average_precision(gathered, targets) -
                                      mean_average_precision(whole, targets))
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    ctx.close()
    Path(f"{out}.rank{ctx.rank}").write_text(json.dumps(gloo_threads()))


def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo started (its loop and the process group's workers)."""
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return sorted(name for name in names if "gloo" in name)


if __name__ == "__main__":
    main(sys.argv[1])

"""Map methods against the peer libraries: images/s, ratio, peak memory and max |diff| of the maps.

Pairs: Grad-CAM and Score-CAM against pytorch-grad-cam and torchcam, SS-CAM against torchcam, saliency,
Integrated Gradients, guided backprop and SmoothGrad against captum. The workload is the pipeline's: every
image asks for the maps of 3 of its classes (a WSSS image carries several labels), so a peer whose API takes
one target per image is called once per class (with the least work its API allows: torchcam's extractors
reuse one forward for the 3 calls). Each pair runs with the same model (torchvision ResNet in eval mode,
random weights from a fixed seed, 20 classes as PASCAL VOC), the same batch, device and layer (``layer4``)
and the same options (noise samples and sigma, IG steps with Gauss-Legendre nodes, masked inputs per
forward). Ours run as the pipeline runs them: under ``pipeline.device.autocast`` (bf16 on CUDA, fp32 on CPU).

Workloads (``WORKLOADS``): on CUDA, ResNet-50 at 224 x 224, 16 images per call (2 for Score-CAM and SS-CAM,
which forward K = 2048 masked inputs per image); on CPU, ResNet-18 at 96 x 96 (``layer4`` is 3 x 3), 2 images
per call (1 for Score-CAM and SS-CAM, K = 512), about 3-4 minutes on 2 cores; ``--quick``: a smoke run.
On a CPU that other jobs share, pass ``--threads 1``: with more threads than free cores every parallel op
waits for the scheduler and the run takes several times longer (the ratios stay fair either way).

Timed runs are interleaved (ours, peer, ours, peer, ...) after one untimed run of each that also gives the
maps and the peak memory; the medians are reported. max_abs_diff compares the maps of every (image, class)
after min-max normalising each map over H x W on both sides (so it is blind to the peers' own scaling).
Score-CAM and SS-CAM differ from both peers by definition (see ``pipeline/maps/scorecam.py``) and SS-CAM's
noise is drawn differently, so those diffs are not rounding; SmoothGrad's noise is captum's (same seed and
draw order, checked on CPU).
Peak memory: the peak of the tensor memory allocated during the call (above what was in use before); on
CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the allocator events the profiler records
(process RSS is no measure here: the C allocator keeps freed memory, so it depends on what ran before).
Memory that a peer holds outside torch (pytorch-grad-cam's numpy copies) is not counted.

    .venv/bin/python -m bench.bench_maps [--quick] [--device auto|cpu|cuda] [--methods gradcam ig ...]

Writes bench/results.json: {method: {ours_ips, peak_mem_mb, peers: {peer: {ips, ratio, max_abs_diff,
peak_mem_mb}}}} and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM draws a bar per image
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (peak memory on CPU) is quiet

import captum.attr as ca  # noqa: E402
import pytorch_grad_cam as pgc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchcam.methods as tm  # noqa: E402
import torchvision  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.device import autocast, resolve_device  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.maps import get_map_method  # noqa: E402

log = logging.getLogger("bench")
Maps = Callable[[], torch.Tensor]  # a prepared call -> maps [B, 3, H, W] of each image's 3 classes
LAYER = "layer4"
METHODS = ("gradcam", "saliency", "guided", "ig", "smoothgrad", "scorecam", "sscam")


@dataclasses.dataclass(frozen=True)
class Workload:
    arch: str
    size: int  # input H = W
    batch: int  # images per call (gradient methods, Grad-CAM)
    score_batch: int  # images per call of Score-CAM / SS-CAM (K masked forwards per image)
    rounds: int  # timed rounds of each call at least ...
    seconds: float  # ... and more, up to MAX_ROUNDS, while a method's rounds have taken less than this
    n: int = 16  # SmoothGrad noisy copies
    sigma: float = 0.15  # SmoothGrad noise std, a fraction of the input range
    steps: int = 16  # IG Gauss-Legendre nodes
    sscam_n: int = 2  # SS-CAM noisy samples
    sscam_sigma: float = 2.0  # SS-CAM noise std on the [0, 1] masks (torchcam's default)
    chunk: int = 32  # masked inputs per forward (Score-CAM, SS-CAM)
    num_classes: int = 20
    per_image: int = 3  # classes asked for per image


MAX_ROUNDS = 25
WORKLOADS = {
    "cuda": Workload("resnet50", 224, batch=16, score_batch=2, rounds=3, seconds=20, sscam_n=4, chunk=64),
    "cpu": Workload("resnet18", 96, batch=2, score_batch=1, rounds=3, seconds=15),
    "quick": Workload("resnet18", 64, batch=1, score_batch=1, rounds=1, seconds=0, n=4, steps=4, sscam_n=1),
}


@dataclasses.dataclass
class Case:
    """One method: our call and the peers' calls on the same inputs."""

    name: str
    batch: int
    ours: Maps
    peers: dict[str, Maps]


def make_model(w: Workload, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(w.arch, weights=None, num_classes=w.num_classes).eval().to(device)


def make_inputs(w: Workload, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B,3,S,S] each spanning [-2, 2] (so captum's one noise std equals ours, sigma x range), and 3
    distinct classes per image [B,3]."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, w.size, w.size, generator=gen)
    lo, hi = x.flatten(1).amin(1).view(-1, 1, 1, 1), x.flatten(1).amax(1).view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo) * 4 - 2
    cls = torch.stack([torch.randperm(w.num_classes, generator=gen)[: w.per_image] for _ in range(batch)])
    return x.to(device), cls.to(device)


def ours(name: str, model: nn.Module, x: torch.Tensor, cls: torch.Tensor, **options) -> Maps:
    """Our method as the pipeline calls it (autocast on CUDA), all classes at once; -> the 3 asked for."""
    mask = torch.zeros((x.shape[0], model.fc.out_features), dtype=torch.bool, device=x.device)
    mask.scatter_(1, cls, True)

    def call() -> torch.Tensor:
        with autocast(x.device):
            out = get_map_method(name)(model, x, mask, **options)
        return out.gather(1, cls[:, :, None, None].expand(-1, -1, *out.shape[-2:])).float()

    return call


def per_class(one: Callable[[list[int]], torch.Tensor], cls: torch.Tensor) -> torch.Tensor:
    """Call a one-target-per-image peer once per class column -> [B, 3, ...]."""
    return torch.stack([torch.as_tensor(one(cls[:, j].tolist())) for j in range(cls.shape[1])], 1)


def captum_peer(make: Callable[[nn.Module], object], model: nn.Module, x: torch.Tensor, cls: torch.Tensor,
                **kw) -> Maps:
    """captum's ``make(model).attribute``: one call per class, max |attribution| over the channels."""

    def call() -> torch.Tensor:
        method = make(model)

        def one(targets: list[int]) -> torch.Tensor:
            torch.manual_seed(0)  # SmoothGrad's noise: the same for every class, as ours (seed 0) draws it
            return method.attribute(x, target=targets, **kw).abs().amax(1)

        return per_class(one, cls)

    return call


def grad_cam_peer(kind: str, model: nn.Module, x: torch.Tensor, cls: torch.Tensor, chunk: int) -> Maps:
    """pytorch-grad-cam's GradCAM / ScoreCAM: one call (forward, backward) per class."""

    def call() -> torch.Tensor:
        with getattr(pgc, kind)(model=model, target_layers=[model.get_submodule(LAYER)]) as cam:
            cam.batch_size = chunk
            return per_class(lambda t: torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(c) for c in t])),
                             cls)

    return call


def torchcam_peer(kind: str, model: nn.Module, x: torch.Tensor, cls: torch.Tensor, **kw) -> Maps:
    """torchcam's extractors: one forward hooks the activations, then one extractor call per class; its maps
    (at the layer's resolution) are upsampled to the input, as the others return them."""

    def call() -> torch.Tensor:
        with getattr(tm, kind)(model, LAYER, input_shape=tuple(x.shape[1:]), **kw) as cam:
            if kind == "GradCAM":
                scores = model(x)
                last = cls.shape[1] - 1
                maps = [cam(class_idx=cls[:, j].tolist(), scores=scores, retain_graph=j < last)[0]
                        for j in range(cls.shape[1])]
            else:
                with torch.no_grad():
                    model(x)
                maps = [cam(class_idx=cls[:, j].tolist())[0] for j in range(cls.shape[1])]
        return F.interpolate(torch.stack(maps, 1), size=x.shape[-2:], mode="bilinear", align_corners=False)

    return call


def cases(w: Workload, model: nn.Module, device: torch.device) -> list[Case]:
    x, cls = make_inputs(w, w.batch, device)
    xs, clss = make_inputs(w, w.score_batch, device)
    # ours with as many rows per forward as the peer's one call has
    ig = {"steps": w.steps, "baseline": 0.0, "chunk": w.batch * w.steps}
    sg = {"n": w.n, "sigma": w.sigma, "mode": "abs", "seed": 0, "chunk": w.batch * w.n}
    sc = {"layer": LAYER, "baseline": 0.0, "probability": "logit", "chunk": w.chunk}
    ss = {**sc, "variant": "activation", "n": w.sscam_n, "sigma": w.sscam_sigma}
    noise_tunnel = lambda m: ca.NoiseTunnel(ca.Saliency(m))  # noqa: E731
    return [
        Case("gradcam", w.batch, ours("gradcam", model, x, cls, layer=LAYER),
             {"pytorch-grad-cam": grad_cam_peer("GradCAM", model, x, cls, w.chunk),
              "torchcam": torchcam_peer("GradCAM", model, x, cls)}),
        Case("saliency", w.batch, ours("saliency", model, x, cls),
             {"captum": captum_peer(ca.Saliency, model, x, cls, abs=True)}),
        Case("guided", w.batch, ours("guided", model, x, cls),
             {"captum": captum_peer(ca.GuidedBackprop, model, x, cls)}),
        Case("ig", w.batch, ours("ig", model, x, cls, **ig),
             {"captum": captum_peer(ca.IntegratedGradients, model, x, cls, baselines=0.0, n_steps=w.steps,
                                    method="gausslegendre")}),
        Case("smoothgrad", w.batch, ours("smoothgrad", model, x, cls, **sg),
             {"captum": captum_peer(noise_tunnel, model, x, cls, nt_type="smoothgrad", nt_samples=w.n,
                                    stdevs=4 * w.sigma, abs=True)}),  # the inputs span 4
        Case("scorecam", w.score_batch, ours("scorecam", model, xs, clss, **sc),
             {"pytorch-grad-cam": grad_cam_peer("ScoreCAM", model, xs, clss, w.chunk),
              "torchcam": torchcam_peer("ScoreCAM", model, xs, clss, batch_size=w.chunk)}),
        Case("sscam", w.score_batch, ours("sscam", model, xs, clss, **ss),
             {"torchcam": torchcam_peer("SSCAM", model, xs, clss, batch_size=w.chunk, num_samples=w.sscam_n,
                                        std=w.sscam_sigma)}),
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(fn: Maps, device: torch.device) -> tuple[torch.Tensor, float]:
    """Run once -> (maps, peak of the tensor memory allocated during the call, in MiB).

    CUDA: the caching allocator's peak above what was allocated before. CPU: the allocator's events as
    recorded by the profiler (``profile_memory``), summed in time order; the peak of that running sum."""
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = itertools.accumulate(nbytes for _, nbytes in events)
    return out, max(running, default=0) / 2**20


def seconds(fn: Maps, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., H, W] min-max normalised to [0, 1] (a constant map -> 0)."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((minmax(a.float()) - minmax(b.to(a.device, torch.float32))).abs().max())


def run_case(case: Case, model: nn.Module, device: torch.device, w: Workload) -> dict:
    calls = {"ours": case.ours, **case.peers}
    maps, mem, times = {}, {}, {k: [] for k in calls}
    for key, fn in calls.items():  # untimed: warm-up, maps and peak memory
        maps[key], mem[key] = measured(fn, device)
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves parameter gradients behind
    t0 = time.perf_counter()
    for r in itertools.count():
        if r >= MAX_ROUNDS or (r >= w.rounds and time.perf_counter() - t0 > w.seconds):
            break
        for key, fn in calls.items():
            times[key].append(seconds(fn, device))
            model.zero_grad(set_to_none=True)
    ips = {k: case.batch / statistics.median(t) for k, t in times.items()}
    return {"ours_ips": round(ips["ours"], 3), "peak_mem_mb": round(mem["ours"], 1),
            "peers": {p: {"ips": round(ips[p], 3), "ratio": round(ips["ours"] / ips[p], 2),
                          "max_abs_diff": float(f"{max_abs_diff(maps['ours'], maps[p]):.3g}"),
                          "peak_mem_mb": round(mem[p], 1)} for p in case.peers}}


def table(results: dict) -> str:
    rows = [f"{'method':<11}{'peer':<17}{'ours ips':>10}{'peer ips':>10}{'ratio':>8}{'max|diff|':>11}"
            f"{'ours MB':>9}{'peer MB':>9}"]
    for name, res in results.items():
        for peer, p in res["peers"].items():
            rows.append(f"{name:<11}{peer:<17}{res['ours_ips']:>10.3g}{p['ips']:>10.3g}{p['ratio']:>7.2f}x"
                        f"{p['max_abs_diff']:>11.2g}{res['peak_mem_mb']:>9.0f}{p['peak_mem_mb']:>9.0f}")
    return "\n".join(rows)


def available(name: str) -> bool:
    try:
        get_map_method(name)
    except ConfigError:
        log.info("%s: not registered (yet), skipped", name)
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (1 image, resnet18 at 64 px, 1 round)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="default: all")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    w = WORKLOADS["quick" if args.quick else device.type]
    torch.backends.cudnn.benchmark = True
    log.info("device %s (%d CPU cores, torch threads %d), %s", device, os.cpu_count(), torch.get_num_threads(), w)
    t0 = time.perf_counter()
    model = make_model(w, device)
    results = {}
    for case in cases(w, model, device):
        if case.name not in args.methods or not available(case.name):
            continue
        results[case.name] = run_case(case, model, device, w)
        log.info("%s done after %.0f s", case.name, time.perf_counter() - t0)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log.info("\n%s\n(ratio: ours / peer images/s; max|diff| of min-max normalised maps; MB: peak memory)\n"
             "%.0f s in all, written to %s", table(results), time.perf_counter() - t0, args.out)


if __name__ == "__main__":
    main()

"""Local against Ray for make_maps and refine on the images of a finished run: wall time and byte identity.

    .venv/bin/python scripts/bench_executors.py --config configs/msrc21.yaml --source runs/msrc21 --images 48

Copies ``classifier.pt`` and the done marker of ``--source`` (left untouched) into temporary run folders,
then times each stage with the local executor (``refine.workers: 1``, the maps in one process) and with Ray
(a local instance of ``--cpus`` CPUs: that many map actors, or refine tasks at a time), start-up included,
and checks that both wrote the same bytes. The README's Scaling section quotes its output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from stages.cli import main


def digests(run: Path, sub: str) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / sub).rglob("*")) if p.is_file()}


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    assert main(args) == 0, args
    return time.perf_counter() - t0


def bench(config: str, source: Path, images: int, cpus: int, refiners: str, work: Path) -> dict:
    common = [f"maps.limit={images}", f"refine.refiners={refiners}", "device=cpu"]
    out: dict = {"images": images, "cpus": cpus}
    runs = {}
    for name, sets in {"local": ["refine.workers=1"],
                       "ray": ["maps.executor=ray", "refine.executor=ray", f"ray.num_cpus={cpus}"]}.items():
        run = work / name
        run.mkdir(parents=True)
        for f in ("classifier.pt", "train_classifier.done.json"):
            shutil.copy2(source / f, run / f)
        args = ["--config", config, "--set", f"run_dir={run}", *common, *sets]
        out[f"make_maps_{name}_s"] = round(timed(["make_maps", *args]), 1)
        out[f"refine_{name}_s"] = round(timed(["refine", *args]), 1)
        runs[name] = run
    for sub in ("maps", "refined"):
        out[f"{sub}_identical"] = digests(runs["local"], sub) == digests(runs["ray"], sub)
    out["make_maps_speedup"] = round(out["make_maps_local_s"] / out["make_maps_ray_s"], 2)
    out["refine_speedup"] = round(out["refine_local_s"] / out["refine_ray_s"], 2)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/msrc21.yaml")
    parser.add_argument("--source", type=Path, default=Path("runs/msrc21"), help="a run folder with classifier.pt")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--refiners", default="[threshold,crf,graphcut]")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_executors_") as tmp:
        print(json.dumps(bench(a.config, a.source, a.images, a.cpus, a.refiners, Path(tmp)), indent=2))

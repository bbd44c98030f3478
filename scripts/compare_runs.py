"""Per-class IoU of two runs side by side, from their metrics.json: a map set, a label set and the segmenter (val),
with each run's mean and the change; e.g. the recipe without and with the salient-object prior.

    .venv/bin/python scripts/compare_runs.py runs/msrc21_off runs/msrc21 [--maps cam] [--masks sam_dc_rw]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def per_class(metrics: dict, kind: str, name: str) -> dict[str, float | None]:
    if kind == "segmenter":
        models = (metrics.get("segmenter") or {}).get("models") or {}
        entry = models.get(name) or {}
    else:
        entry = metrics.get(kind, {}).get(name) or {}
    return {c: v["iou"] for c, v in (entry.get("per_class") or {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--maps", default="cam", help="the map set (maps/<name>/)")
    parser.add_argument("--masks", default="sam_dc_rw", help="the label set (refined/<name>/)")
    args = parser.parse_args()
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (args.first, args.second))
    columns = [("maps", args.maps), ("pseudo_masks", args.masks), ("segmenter", "segmenter")]
    tables = [(per_class(a, k, n), per_class(b, k, n)) for k, n in columns]
    classes = list(next((t[0] for t in tables if t[0]), {}))
    print("| class | " + " | ".join(f"{n}: {args.first.name} | {n}: {args.second.name} | change"
                                     for _, n in columns) + " |")
    print("|---|" + "---|---|---|" * len(columns))

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    def change(x: float | None, y: float | None) -> str:
        return "–" if x is None or y is None else f"{y - x:+.3f}"

    for c in classes:
        cells = [f"{cell(x.get(c))} | {cell(y.get(c))} | {change(x.get(c), y.get(c))}" for x, y in tables]
        print(f"| {c} | " + " | ".join(cells) + " |")
    means = []
    for x, y in tables:
        xs = [v for v in x.values() if v is not None]
        ys = [v for v in y.values() if v is not None]
        mx, my = (sum(xs) / len(xs) if xs else None), (sum(ys) / len(ys) if ys else None)
        means.append(f"**{cell(mx)}** | **{cell(my)}** | **{change(mx, my)}**")
    print("| **mean** | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main()

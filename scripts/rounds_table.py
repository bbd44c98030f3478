"""Per-class IoU of a run's first and decoupled rounds, from its metrics.json: the maps and the label sets of each
round side by side, the mean over the given classes and over all, and the classes that lose the most.

    .venv/bin/python scripts/rounds_table.py runs/msrc21 [--classes face body boat]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAIRS = [("maps", "cam", "cam_dc"), ("maps", "cam_rw", "cam_dc_rw"), ("pseudo_masks", "graphcut_rw", "graphcut_dc_rw"),
         ("pseudo_masks", "sam_rw", "sam_dc_rw"), ("pseudo_masks", "graphcut", "graphcut_dc")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--classes", nargs="*", default=["face", "body", "boat"])
    args = parser.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    for kind, first, second in PAIRS:
        if first not in metrics.get(kind, {}) or second not in metrics[kind]:
            continue
        a, b = metrics[kind][first]["per_class"], metrics[kind][second]["per_class"]
        names = [c for c in a if a[c]["iou"] is not None and b[c]["iou"] is not None]
        sel = [c for c in args.classes if c in names]
        print(f"\n## {kind}: {first} -> {second}")
        print("| class | " + first + " | " + second + " | change |\n|---|---|---|---|")
        for c in names:
            print(f"| {c} | {a[c]['iou']:.3f} | {b[c]['iou']:.3f} | {b[c]['iou'] - a[c]['iou']:+.3f} |")
        mean = lambda d, cs: sum(d[c]["iou"] for c in cs) / len(cs)  # noqa: E731
        print(f"| **mean of {', '.join(sel)}** | {mean(a, sel):.3f} | {mean(b, sel):.3f} | "
              f"{mean(b, sel) - mean(a, sel):+.3f} |")
        print(f"| **mean of all {len(names)}** | {mean(a, names):.3f} | {mean(b, names):.3f} | "
              f"{mean(b, names) - mean(a, names):+.3f} |")
        worst = sorted((b[c]["iou"] - a[c]["iou"], c) for c in names if c not in sel)[:3]
        print("largest losses among the others: " + ", ".join(f"{c} {d:+.3f}" for d, c in worst))


if __name__ == "__main__":
    main()

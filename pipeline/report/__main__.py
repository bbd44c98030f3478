"""``python -m pipeline.report CONFIG``: print where the run of CONFIG has its report (``make stages`` ends so)."""

from __future__ import annotations

import sys

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.report import report_path


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv[0] if argv else "configs/default.yaml")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = report_path(cfg.run_path).resolve()
    if not path.exists():
        print(f"no report yet: {path} (run: wsss report --config {argv[0] if argv else 'configs/default.yaml'})")
        return 1
    print(f"report: {path}\n  open it in a browser: file://{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Command line: ``wsss <stage>|all [--config configs/default.yaml] [--force] [--set key=value ...]``.

Errors a user can cause end in one line naming the file or key, with exit status 2 (no traceback).
Ctrl-C ends with exit status 130; rerunning the same command resumes where the stage stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import yaml

from pipeline.config import dump_config, load_config
from pipeline.errors import UserError, first_line
from pipeline.runfolder import write_text


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set classifier.epochs=3")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({first_line(exc)})") from None
    return out


def _fail(message: str) -> int:
    """Print the error as one line (no traceback) and return the exit status of a user error."""
    _close_progress_bars()
    print("error: " + " ".join(line.strip() for line in message.splitlines()), file=sys.stderr)
    return 2


def _close_progress_bars() -> None:
    """Close the progress bars that an exception left open, so that the message gets a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    from stages import STAGES

    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "all"], help="the stage to run, or all of them in order")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--force", action="store_true", help="redo the stage even if it is up to date")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("wsss")
    try:
        cfg = load_config(args.config, _parse_set(args.set))
        write_text(cfg.run_path / "config.yaml", dump_config(cfg))
        names = list(STAGES) if args.stage == "all" else [args.stage]
        for name in names:
            t0 = time.perf_counter()
            STAGES[name](cfg, force=args.force)
            log.info("%s: %.1f s", name, time.perf_counter() - t0)
    except UserError as exc:
        return _fail(str(exc))
    except OSError as exc:  # a file the user named, or the disk: unreadable, a folder, no permission...
        if exc.filename is None:
            raise
        return _fail(f"{exc.filename}: {exc.strerror or first_line(exc)}")
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

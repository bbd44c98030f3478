"""Command line: ``wsss <stage>|all [--config configs/default.yaml] [--force] [--set key=value ...]``,
``wsss predict --images DIR --out DIR [--checkpoint runs/<name>/segmenter.pt] [--crf]``, and the review round trip:
``wsss review [--limit N] [--out DIR]`` and ``wsss import-masks <folder>`` (stages/review.py).

Errors a user can cause end in one line naming the file or key, with exit status 2 (no traceback).
Ctrl-C ends with exit status 130; rerunning the same command resumes where the stage stopped.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import yaml
from tqdm import tqdm

from pipeline.config import dump_config, load_config
from pipeline.device import resolve_device
from pipeline.distributed import check_torchrun_command, torchrun_rank
from pipeline.errors import UserError, first_line
from pipeline.models.segmenter import load_segmenter
from pipeline.runfolder import run_lock, write_text
from pipeline.segmenter.predict import Predictor, checked_scales, predict_folder
from stages import STAGES
from stages.review import import_corrections, review

SET_ITEM = re.compile(r"[A-Za-z_][\w.-]*=")  # a config key and "=": how a --set item starts


def split_set_items(argv: list[str]) -> list[str]:
    """``argv`` with each ``--set`` item as a ``--set=KEY=VALUE`` of its own: the word after a ``--set`` is its item,
    and the next words are items too while they look like KEY=VALUE (``--set a=1 b=2``, as documented). A word that
    does not (``import-masks --set a=1 FOLDER``'s folder) ends the items instead of being swallowed by them."""
    out, state = [], "out"  # state: "out" of a --set, "first" word after one, "more" words after its first item
    for k, word in enumerate(argv):
        if word == "--":
            return out + argv[k:]
        if word == "--set":
            state = "first"
        elif state == "first" and not word.startswith("-") or state == "more" and SET_ITEM.match(word):
            out.append(f"--set={word}")
            state = "more"
        else:
            out.append(word)
            state = "out"
    return out


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
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "all", "predict", *COMMANDS],
                        help="the stage to run, all of them in order, predict (a trained segmenter on a folder), "
                             "review (the least-confident masks as a CVAT package) or import-masks (corrected masks)")
    parser.add_argument("folder", nargs="?", help="import-masks: the folder of corrected masks (an export from CVAT)")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--force", action="store_true", help="redo the stage even if it is up to date")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override config keys: --set a=1 b=2, or --set a=1 --set b=2 (every item counts)")
    predict = parser.add_argument_group("predict")
    predict.add_argument("--images", help="folder of images to segment")
    predict.add_argument("--out", help="output folder: masks/<image>.png, overlays/<image>.jpg, legend.json; "
                                       "review: the package's folder (default <run_dir>/review)")
    parser.add_argument("--limit", type=int, help="review: the number of images (default 20; more than the run "
                                                  "has means all)")
    predict.add_argument("--checkpoint", help="segmenter checkpoint (default: <run_dir>/segmenter.pt)")
    predict.add_argument("--crf", action="store_true", help="dense-CRF post-processing (default: segmenter.crf)")
    # import-masks --config C <folder>: the folder after the options
    args = parser.parse_intermixed_args(split_set_items(sys.argv[1:] if argv is None else list(argv)))
    if args.stage == "predict" and not (args.images and args.out):
        parser.error("predict needs --images DIR and --out DIR")
    if (args.stage == "import-masks") != bool(args.folder):
        parser.error("import-masks needs the folder of corrected masks" if args.folder is None else
                     f"unexpected argument {args.folder!r} (a folder is for import-masks)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("wsss")
    try:
        cfg = load_config(args.config, _parse_set(args.set))
        if args.stage == "predict":
            _predict(cfg, args, log)
            return 0
        if args.stage in COMMANDS:
            with run_lock(cfg.run_path):
                COMMANDS[args.stage](cfg, args)
            return 0
        names = list(STAGES) if args.stage == "all" else [args.stage]
        check_torchrun_command(names)  # under torchrun: one training stage only, else a one-line error
        # one process per run folder (under torchrun, rank 0 holds the lock for the others)
        with run_lock(cfg.run_path) if torchrun_rank() == 0 else nullcontext():
            if torchrun_rank() == 0:
                write_text(cfg.run_path / "config.yaml", dump_config(cfg))
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


def _review(cfg, args: argparse.Namespace) -> None:
    review(cfg, args.limit, args.out)


def _import_masks(cfg, args: argparse.Namespace) -> None:
    import_corrections(cfg, args.folder)


COMMANDS = {"review": _review, "import-masks": _import_masks}  # on a run folder, apart from the stages


def _predict(cfg, args: argparse.Namespace, log: logging.Logger) -> None:
    device = resolve_device(cfg.device)
    path = Path(args.checkpoint) if args.checkpoint else cfg.run_path / "segmenter.pt"
    net, ckpt = load_segmenter(path, device)
    crf = cfg.refine.crf if (args.crf or cfg.segmenter.crf) else None
    names = (["background"] if ckpt["background"] else []) + list(ckpt["classes"])
    scales = checked_scales(cfg.segmenter.test_scales)
    n = predict_folder(Predictor(net, ckpt, device, cfg.segmenter.flip_test, crf, scales), names, Path(args.images),
                       Path(args.out))
    log.info("predict: %d images -> %s (masks/, overlays/, legend.json)%s", n, args.out, " with CRF" if crf else "")


if __name__ == "__main__":
    sys.exit(main())

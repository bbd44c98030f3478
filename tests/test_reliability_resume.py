"""Interruption and determinism through the real CLI.

A stage killed midway (SIGINT, as Ctrl-C sends it to the whole process group, or SIGKILL), then run again,
skips the items it had finished and ends with outputs byte-identical to an uninterrupted run; two runs of
one config give identical outputs. Which stages a change makes stale: tests/test_staleness.py.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import on_tiny

from pipeline.runfolder import read_json, write_json
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train_classifier", "make_maps", "refine", "export", "train_segmenter", "evaluate")
STAGE_TIMEOUT_S = 180
# Big enough that each stage runs for a second or more after its first output, so a poll every few
# milliseconds always catches it midway: 6 epochs, 96 images x 2 scales x flip, 3 refiners.
CONFIG = {
    "device": "cpu",
    "data": {"kind": "synthetic", "synthetic": {"n_train": 96, "n_val": 8, "size": 32, "seed": 5}},
    "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 6, "batch_size": 16},
    "maps": {"scales": [1.0, 1.5], "flip": True},
    "refine": {"workers": "2", "refiners": ["threshold", "graphcut", "crf"]},
    "segmenter": {"backbone": "smallcnn", "pretrained": "none", "channels": 16, "atrous_rates": [1, 2, 3],
                  "input_size": 32, "crop_size": 32, "epochs": 2, "batch_size": 16},
}
N_IMAGES = CONFIG["data"]["synthetic"]["n_train"]  # maps.split is train
# What each stage writes (besides its done marker), so a run folder can start from another's earlier stages.
STAGE_FILES = {"train_classifier": ["classifier.pt", "train_log.json", "plots/classifier.png"],
               "make_maps": ["maps"], "refine": ["refined"], "export": ["pseudo_masks"],
               "train_segmenter": ["segmenter.pt", "segmenter_log.json", "plots/segmenter.png", "segmenter_gt.pt",
                                   "segmenter_gt_log.json", "plots/segmenter_gt.png", "train_segmenter_gt.done.json"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train with one thread in-process too, as the subprocesses do (OMP_NUM_THREADS=1): the same float
    reductions, so that weights trained partly here and partly there can be byte-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(base: Path, name: str, config: dict = CONFIG) -> Path:
    cfg = {**config, "run_dir": str(base / name),
           "data": {**config["data"], "root": str(base / "data")}}
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    return path


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """An uninterrupted run: the outputs every other run must reproduce byte for byte."""
    base = tmp_path_factory.mktemp("reliability")
    assert main(["all", "--config", str(write_config(base, "ref"))]) == 0
    return base / "ref"


def outputs(run: Path) -> dict[str, str]:
    """Every file of a run folder by a digest of its bytes. Left out or reduced: what records time or the run
    folder's own path (config.yaml; done markers to their fingerprint; metrics.json without timing_s);
    symbolic links by their target."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if rel in ("config.yaml", "report.html") or (p.is_dir() and not p.is_symlink()):
            continue
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif rel.endswith(".done.json"):
            out[rel] = read_json(p)["fingerprint"]
        elif rel == "metrics.json":
            out[rel] = json.dumps({k: v for k, v in read_json(p).items() if k != "timing_s"}, sort_keys=True)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def seed_run(ref: Path, run: Path, stages: list[str]) -> None:
    """Start ``run`` with the outputs of the given finished stages of ``ref``, as if it had run them."""
    for stage in stages:
        for rel in [*STAGE_FILES[stage], f"{stage}.done.json"]:
            src, dst = ref / rel, run / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst)


def signature(paths: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """Inode and modification time: unchanged when a rerun left the file alone."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


# ``python -m stages.cli`` with Python's own Ctrl-C handler: a shell that starts the suite in the background (``make
# test &``) hands its children SIGINT ignored, and Python keeps an inherited "ignore", so the stage would not stop.
CLI_WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "runpy.run_module('stages.cli', run_name='__main__', alter_sys=True)")


def interrupt(stage: str, cfg: Path, run: Path, ready: Callable[[], bool], sig: signal.Signals, log: Path) -> str:
    """Run ``wsss <stage>`` in a subprocess, send ``sig`` to its process group as soon as ``ready()``, and
    return its stderr. It must die of the signal midway: SIGINT ends in one 'interrupted' line, no traceback."""
    with log.open("w") as err:  # a file, not a pipe: progress bars would fill a pipe and block the stage
        proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_CTRL_C, stage, "--config", str(cfg)], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + STAGE_TIMEOUT_S
            while not ready():
                assert proc.poll() is None, f"{stage} ended before it was interrupted:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"{stage} made no output in {STAGE_TIMEOUT_S} s"
                time.sleep(0.005)
            os.killpg(proc.pid, sig)
            status = proc.wait(timeout=STAGE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    if sig == signal.SIGINT:
        assert status == 130 and "Traceback" not in text, text
        assert text.rstrip().splitlines()[-1] == "interrupted: rerun the same command to resume"
    else:
        assert status == -signal.SIGKILL
    assert not (run / f"{stage}.done.json").exists() and (run / f"{stage}.partial.json").exists()  # midway
    return text


def files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def saved_epoch(resume: Path) -> int:
    return torch.load(resume, map_location="cpu", weights_only=False)["epoch"]


@pytest.mark.slow
def test_resume_train_classifier_after_sigint_and_sigkill(ref, caplog):
    base = ref.parent
    cfg, run = write_config(base, "train_killed"), base / "train_killed"
    resume = run / "classifier.resume.pt"
    interrupt("train_classifier", cfg, run, resume.exists, signal.SIGINT, base / "train1.log")
    first, after_first = saved_epoch(resume), signature([resume])
    log = interrupt("train_classifier", cfg, run, lambda: resume.exists() and signature([resume]) != after_first,
                    signal.SIGKILL, base / "train2.log")
    second = saved_epoch(resume)
    assert f"resuming classifier training after epoch {first}" in log and second > first
    caplog.set_level("INFO")
    assert main(["all", "--config", str(cfg)]) == 0
    assert f"resuming classifier training after epoch {second}" in caplog.text
    assert not resume.exists()
    assert outputs(run) == outputs(ref)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "first", "second"), [
    pytest.param("make_maps", "maps/cam/*.npz", "maps/cam/*.npz", id="make_maps"),
    pytest.param("refine", "refined/graphcut/*.png", "refined/crf/*.png", id="refine"),
])
def test_resume_per_item_stage_after_sigint_and_sigkill(ref, stage, first, second):
    """SIGINT at the first output of ``first``, then SIGKILL at the first new output of ``second`` in the
    rerun: Ctrl-C stops promptly, the rerun and the final run leave the finished items alone, and the end
    result is the uninterrupted run's."""
    base = ref.parent
    cfg, run = write_config(base, f"{stage}_killed"), base / f"{stage}_killed"
    seed_run(ref, run, list(STAGES[:STAGES.index(stage)]))
    interrupt(stage, cfg, run, lambda: bool(files(run, first)), signal.SIGINT, base / f"{stage}1.log")
    finished = files(run, first)
    assert 0 < len(finished) < N_IMAGES  # the queued images were dropped, not worked through
    kept = signature(finished)
    interrupt(stage, cfg, run, lambda: bool(set(files(run, second)) - set(finished)), signal.SIGKILL,
              base / f"{stage}2.log")
    assert signature(finished) == kept  # the rerun left the items of the first one alone
    (run / second).parent.joinpath(".cut_short.png.k2x8.tmp").write_bytes(b"half")  # as a write killed midway
    finished = sorted({*files(run, first), *files(run, second)})
    kept = signature(finished)
    assert main(["all", "--config", str(cfg)]) == 0
    assert signature(finished) == kept  # and so did the final run
    assert outputs(run) == outputs(ref)  # no temp file left over, no half-written file, the same bytes


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "target", "leftover"), [
    pytest.param("export", "pipeline.export._place_image", ".pseudo_masks.tmp/SegmentationClass/syn_00000.png",
                 id="export"),
    pytest.param("evaluate", "stages.evaluate.evaluate_labels", ".metrics.json.k2x8.tmp", id="evaluate"),
])
def test_resume_export_and_evaluate_after_interrupt(ref, monkeypatch, stage, target, leftover):
    """These stages last well under a second, too short to kill from outside midway: Ctrl-C is raised from
    inside instead, and what a SIGKILL would leave behind (``leftover``) is planted. The rerun cleans up."""
    base = ref.parent
    cfg, run = write_config(base, f"{stage}_stopped"), base / f"{stage}_stopped"
    seed_run(ref, run, list(STAGES[:STAGES.index(stage)]))
    module, name = target.rsplit(".", 1)
    real, calls = getattr(importlib.import_module(module), name), []

    def stop_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, stop_midway)
    assert main([stage, "--config", str(cfg)]) == 130
    monkeypatch.undo()
    assert not (run / f"{stage}.done.json").exists() and not (run / ".pseudo_masks.tmp").exists()
    (run / leftover).parent.mkdir(parents=True, exist_ok=True)
    (run / leftover).write_bytes(b"half")
    assert main(["all", "--config", str(cfg)]) == 0
    assert outputs(run) == outputs(ref)


@pytest.mark.slow
def test_force_redoes_a_stage_without_resume(ref):
    """An interrupted stage rerun with --force starts afresh: every item is recomputed (same bytes)."""
    base = ref.parent
    cfg, run = write_config(base, "forced"), base / "forced"
    seed_run(ref, run, ["train_classifier", "make_maps"])
    maps = files(run, "maps/cam/*.npz")
    done, todo = maps[: len(maps) // 2], maps[len(maps) // 2:]
    for p in todo:
        p.unlink()
    write_json(run / "make_maps.partial.json", {"fingerprint": read_json(run / "make_maps.done.json")["fingerprint"]})
    (run / "make_maps.done.json").unlink()
    before = signature(done)
    assert main(["make_maps", "--config", str(cfg), "--force"]) == 0
    after = signature(done)
    assert all(after[p] != before[p] for p in before)
    ref_maps = {k: v for k, v in outputs(ref).items() if k.startswith("maps/") or k == "make_maps.done.json"}
    assert {k: v for k, v in outputs(run).items() if k.startswith("maps/") or k.startswith("make_maps")} == ref_maps


@pytest.mark.slow
def test_deterministic_two_runs_byte_identical(ref):
    base = ref.parent
    assert main(["all", "--config", str(write_config(base, "again"))]) == 0
    again, first = outputs(base / "again"), outputs(ref)
    pseudo = [k for k in first if k.startswith("pseudo_masks/SegmentationClass/")]
    assert len(pseudo) == N_IMAGES and all(again[k] == first[k] for k in pseudo)
    assert again == first

"""make_maps and refine on Ray (``maps.executor: ray``, ``refine.executor: ray``) against a local run.

A local Ray instance with 2 CPUs is started by the stages themselves (``ray.address: null``). Needs the
optional ``ray`` extra (``pip install -e '.[ray]'``, part of ``.[dev]``); skipped without it. Run alone:
``OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_distributed_ray.py``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import on_tiny

from pipeline.runfolder import read_json, write_json
from stages.cli import main

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # each test needs the module's local and Ray runs of three stages

CONFIG = {
    "device": "cpu",
    "data": {"kind": "synthetic", "synthetic": {"n_train": 24, "n_val": 8, "size": 32, "seed": 5}},
    "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 1, "batch_size": 8},
    "maps": {"methods": ["cam", "gradcam"], "scales": [1.0, 1.5], "flip": True},
    "refine": {"workers": "1", "refiners": ["threshold", "crf", "graphcut"]},
    "ray": {"num_cpus": 2, "shard_size": 5},
}
RAY = ["maps.executor=ray", "refine.executor=ray"]


def write_config(base: Path, name: str) -> Path:
    cfg = {**CONFIG, "run_dir": str(base / name), "data": {**CONFIG["data"], "root": str(base / "data")}}
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    return path


def files(run: Path) -> dict[str, bytes]:
    """The bytes of every map and refined label file of a run folder."""
    return {str(p.relative_to(run)): p.read_bytes()
            for sub in ("maps", "refined") for p in sorted((run / sub).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A local run (train_classifier, make_maps, refine) and a Ray run of make_maps and refine on its classifier."""
    base = tmp_path_factory.mktemp("ray")
    local_cfg, ray_cfg = write_config(base, "local"), write_config(base, "ray")
    for stage in ("train_classifier", "make_maps", "refine"):
        assert main([stage, "--config", str(local_cfg)]) == 0
    local, run = base / "local", base / "ray"
    run.mkdir()
    for name in ("classifier.pt", "train_classifier.done.json"):
        shutil.copy2(local / name, run / name)
    for stage in ("make_maps", "refine"):
        assert main([stage, "--config", str(ray_cfg), "--set", *RAY]) == 0
    return local, run, ray_cfg


def test_ray_outputs_byte_identical_to_local(runs):
    local, run, _ = runs
    ours, theirs = files(local), files(run)
    assert len(ours) == 24 * 2 + 24 * 3  # cam + gradcam maps, three refiners
    assert sorted(theirs) == sorted(ours)
    assert [k for k in ours if ours[k] != theirs[k]] == []
    for stage in ("make_maps", "refine"):  # the executor is not part of a stage's fingerprint
        assert read_json(run / f"{stage}.done.json")["fingerprint"] == read_json(local / f"{stage}.done.json")[
            "fingerprint"]


def test_ray_run_resumes_and_switching_executor_reruns_nothing(runs, caplog):
    """An interrupted Ray refine (half its files gone, the stage marked under way) finishes the rest on Ray,
    leaves the finished files alone and ends with the local run's bytes; then the local executor skips."""
    local, run, cfg = runs
    done = read_json(run / "refine.done.json")
    labels = sorted((run / "refined" / "crf").glob("*.png"))
    for p in labels[::2]:
        p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in labels[1::2]}
    write_json(run / "refine.partial.json", {"fingerprint": done["fingerprint"]})
    (run / "refine.done.json").unlink()
    assert main(["refine", "--config", str(cfg), "--set", *RAY]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert files(run) == files(local)
    caplog.set_level("INFO")
    assert main(["make_maps", "--config", str(cfg)]) == 0
    assert main(["refine", "--config", str(cfg)]) == 0
    assert caplog.text.count("up to date, skipped") == 2


def test_ray_missing_is_one_line_and_destroys_nothing(runs, monkeypatch, capsys):
    _, run, cfg = runs
    before = files(run)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["refine", "--config", str(cfg), "--force", "--set", "refine.executor=ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refine.executor" in err and "pip install" in err, err
    assert files(run) == before and (run / "refine.done.json").exists()


def test_ray_unreachable_address_is_one_line(runs, capsys):
    _, run, cfg = runs
    assert main(["make_maps", "--config", str(cfg), "--force", "--set", "maps.executor=ray",
                 "ray.address=127.0.0.1:1"]) == 2  # nothing listens there
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ray.address" in err, err
    assert (run / "make_maps.done.json").exists()

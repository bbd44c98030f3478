"""Classifier training under torchrun (DDP, gloo on CPU) against the single-process run.

Each torchrun job is a subprocess (``python -m torch.distributed.run --standalone``) on a tiny synthetic set
with the ``smallcnn`` backbone. What is asserted, and the figures measured when these tests were written:
- the building blocks (tests/ddp_check.py), 2 processes with global BatchNorm against one process on the
  whole batch: in float64 (bounded by the float32 loss), one step's gradients within 1e-6 relative for
  smallcnn and for EfficientNet-Lite0's BatchNorm+activation layers (measured 2e-8 to 5e-8), also for a
  batch split 3 + 2; after 4 SGD steps more the weights within 1e-6 (1.4e-10); in float32 the gradients
  within 1e-5 (8e-7) and the weights after the SGD steps within 1e-3 (2e-8 to 1.2e-5: where a
  pre-activation lies within float error of 0, the two ReLUs pass different gradients); sharded
  validation scores gathered equal the whole set's (0.0);
- the stage, 2 epochs of AdamW: the first epoch's mean loss within 1e-3 relative (3.5e-5), the weights within
  5 % relative norm (1.3 %; without synchronised BatchNorm 17 %): Adam's update g / (|g| + 1e-8) turns the
  1e-6 float noise of gradient components near 1e-8 into steps of the learning rate's size, so the runs drift
  apart faster than SGD's;
- torchrun with one process gives the plain run's weights bit for bit; rank 0 alone logs and writes; a run
  killed midway resumes under torchrun and ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import on_tiny

from pipeline.config import load_config
from pipeline.distributed import DistContext, GlobalBatchSampler, check_torchrun_command, epoch_permutation
from pipeline.errors import ConfigError
from stages import make_maps, refine
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
CONFIG = {
    "device": "cpu",
    "data": {"kind": "synthetic", "synthetic": {"n_train": 48, "n_val": 16, "size": 32, "seed": 5}},
    "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 2, "batch_size": 16},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread in-process too, as in the torchrun processes (OMP_NUM_THREADS=1): the same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(base: Path, name: str, **classifier) -> Path:
    cfg = {**CONFIG, "run_dir": str(base / name), "data": {**CONFIG["data"], "root": str(base / "data")},
           "classifier": {**CONFIG["classifier"], **classifier}}
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    return path


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


# The subprocesses: one thread each, and this repository's pipeline (a script such as tests/ddp_check.py has its
# own folder first on its path, not the working directory).
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(cmd: list[str], log: Path) -> str:
    with log.open("w") as out:  # a file, not a pipe: progress bars would fill a pipe
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def train(nproc: int, cfg: Path, log: Path) -> str:
    return run(torchrun(nproc, "-m", "stages.cli", "train_classifier", "--config", str(cfg)), log)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "classifier.pt", map_location="cpu", weights_only=False)["state_dict"]


def rel_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a| over all the parameters together (BatchNorm buffers left out)."""
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    return (sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys) ** 0.5 /
            sum((a[k].double() ** 2).sum() for k in keys) ** 0.5).item()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def single(base) -> Path:
    """The plain run, without torchrun."""
    assert main(["train_classifier", "--config", str(write_config(base, "single"))]) == 0
    return base / "single"


@pytest.fixture(scope="module")
def ddp2(base) -> tuple[Path, str]:
    """torchrun with 2 processes (gloo), and its log."""
    return base / "ddp2", train(2, write_config(base, "ddp2"), base / "ddp2.log")


def test_distributed_sampler_splits_each_global_batch():
    n, batch = 23, 8
    one = list(GlobalBatchSampler(n, batch, shuffle=True, seed=7))
    assert one == [b for b in GlobalBatchSampler(n, batch, shuffle=True, seed=7).global_batches()]
    assert sorted(i for b in one for i in b) == list(range(n)) and [len(b) for b in one] == [8, 8, 7]
    for world in (2, 4):
        ranks = [list(GlobalBatchSampler(n, batch, r, world, shuffle=True, seed=7)) for r in range(world)]
        for step, whole in enumerate(one):  # rank r takes items r, r+N, ... of the same global batch
            assert [ranks[r][step] for r in range(world)] == [whole[r::world] for r in range(world)]
    # DataLoader(shuffle=True) after torch.manual_seed(s) drew this order: the plain run's order is unchanged
    torch.manual_seed(1007)
    assert list(torch.utils.data.RandomSampler(range(n))) == epoch_permutation(n, 1007)
    with pytest.raises(ConfigError, match="'classifier.batch_size': 15 is not divisible by the 2 processes"):
        DistContext(world_size=2).local_batch_size(15, "classifier.batch_size")
    with pytest.raises(ConfigError, match="last batch of 1 of 17 samples cannot be split over 2 processes"):
        GlobalBatchSampler(17, 8, 0, 2, shuffle=False)
    assert len(GlobalBatchSampler(17, 8, 0, 2, shuffle=False, drop_last=True)) == 2


@pytest.mark.slow
def test_distributed_building_blocks_match_one_process(base):
    out = base / "check.json"
    run(torchrun(2, str(REPO / "tests" / "ddp_check.py"), str(out)), base / "check.log")
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    for net in ("smallcnn", "tf_efficientnet_lite0"):  # in float64 (the loss itself is float32: ~1e-8)
        assert r[f"{net}/float64/grad"] < 1e-6 and r[f"{net}/float64/uneven"] < 1e-6, r
    assert r["smallcnn/float64/sgd"] < 1e-6, r
    assert r["smallcnn/float32/grad"] < 1e-5 and r["smallcnn/float32/uneven"] < 1e-5, r
    assert r["smallcnn/float32/sgd"] < 1e-3, r
    assert r["val"] < 1e-6 and r["val_map_diff"] == 0.0, r
    # every rank's process group is gone after close(): no gloo thread is left for the interpreter's shutdown
    assert [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in (0, 1)] == [[], []]


@pytest.mark.slow
def test_ddp_two_processes_train_the_single_process_model(single, ddp2):
    run_dir, log = ddp2
    ours, theirs = (json.loads((d / "train_log.json").read_text()) for d in (single, run_dir))
    assert len(theirs) == 2 and abs(theirs[0]["loss"] - ours[0]["loss"]) < 1e-3 * ours[0]["loss"]
    assert abs(theirs[-1]["val_map"] - ours[-1]["val_map"]) < 0.05
    assert rel_norm(weights(single), weights(run_dir)) < 0.05
    # rank 0 alone logs and writes: one line per epoch, the outputs of one run, no leftovers
    assert "cpu x 2 processes" in log and log.count("epoch 2/2  loss") == 1 and log.count("train_classifier: ") == 2
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "classifier.pt", "config.yaml", "label_stats.json",
                                                         "plots", "train_classifier.done.json", "train_log.json"]


@pytest.mark.slow
def test_ddp_one_process_is_the_plain_run(base, single):
    train(1, write_config(base, "ddp1"), base / "ddp1.log")
    ours, theirs = weights(single), weights(base / "ddp1")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (Linux /proc): torchrun starts each worker in a session of its own."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers at once, as the out-of-memory killer or a lost machine would."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_ddp_resumes_after_sigkill(base, ddp2):
    cfg, run_dir = write_config(base, "killed"), base / "killed"
    resume = run_dir / "classifier.resume.pt"
    log = base / "killed1.log"
    with log.open("w") as out:
        proc = subprocess.Popen(torchrun(2, "-m", "stages.cli", "train_classifier", "--config", str(cfg)), cwd=REPO,
                                env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not resume.exists():  # rank 0 saved the first epoch
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.005)
            kill_tree(proc.pid)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait()
    assert not (run_dir / "train_classifier.done.json").exists()
    text = train(2, cfg, base / "killed2.log")
    assert "resuming classifier training after epoch 1" in text
    assert not resume.exists()
    ours, theirs = weights(ddp2[0]), weights(run_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_distributed_other_stages_refused_or_rank_0_only(base, monkeypatch):
    """Under torchrun with 2 processes: a command other than one training stage is refused in one line
    (``check_torchrun_command``, for the CLI); make_maps and refine return at once on the ranks other than 0."""
    check_torchrun_command(["make_maps", "refine"])  # no torchrun: anything goes
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_torchrun_command(["train_classifier"])
    for names, shown in ((["make_maps"], "not make_maps"), (["train_classifier", "make_maps"], "not all")):
        with pytest.raises(ConfigError, match=f"torchrun runs one training stage .* on its 2 processes, {shown}"):
            check_torchrun_command(names)
    cfg = load_config(write_config(base, "rank1"))
    make_maps.run(cfg)  # no classifier.pt there: rank 0 would fail, rank 1 does nothing
    refine.run(cfg)
    assert not (base / "rank1").exists()


SEGMENTER = {"masks": "gt", "backbone": "smallcnn", "pretrained": "none", "channels": 16, "atrous_rates": [1, 2, 3],
             "input_size": 32, "crop_size": 32, "epochs": 2, "batch_size": 16}


@pytest.mark.slow
def test_ddp_two_processes_train_the_single_process_segmenter(base):
    """The segmenter under torchrun (on the GT masks, so that no maps are needed): its loss is a mean over the
    labelled pixels, and the processes' shares are weighted by their pixel counts as one process would. The
    ASPP's Dropout(0.5) draws its masks from each process's own generator, so here the runs differ from the
    first batch on (first-epoch loss measured 0.5 % apart) and the tolerances are wider than the classifier's."""
    configs = {}
    for name in ("seg_single", "seg_ddp2"):
        configs[name] = write_config(base, name)
        cfg = yaml.safe_load(configs[name].read_text())
        configs[name].write_text(yaml.safe_dump(on_tiny({**cfg, "segmenter": SEGMENTER})))
    assert main(["train_segmenter", "--config", str(configs["seg_single"])]) == 0
    log = run(torchrun(2, "-m", "stages.cli", "train_segmenter", "--config", str(configs["seg_ddp2"])),
              base / "seg_ddp2.log")
    ours, theirs = (json.loads((base / d / "segmenter_log.json").read_text()) for d in ("seg_single", "seg_ddp2"))
    assert len(theirs) == 2 and abs(theirs[0]["loss"] - ours[0]["loss"]) < 2e-2 * ours[0]["loss"]
    assert abs(theirs[-1]["val_miou"] - ours[-1]["val_miou"]) < 0.05
    a, b = (torch.load(base / d / "segmenter.pt", weights_only=False)["state_dict"] for d in ("seg_single", "seg_ddp2"))
    assert rel_norm(a, b) < 0.05
    assert "cpu x 2 processes" in log and log.count("segmenter epoch 2/2  loss") == 1
    assert not (base / "seg_ddp2" / "segmenter_gt.pt").exists()

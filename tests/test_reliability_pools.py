"""Reliability of the worker processes and of the run folder, through the real CLI: a refine pool started after
the main process used OpenCV's thread pool finishes (it hung forever when workers were forked); a worker that
dies or stalls ends the stage with one line and the finished images stay done; refiners give the same bytes in
the main process and in pool workers; two processes never share a run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import on_tiny

from pipeline.config import RefineConfig
from pipeline.refine import REFINERS, get_refiner
from pipeline.workers import WorkerFailed, run_pool
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 16
SLOW_GRAPHCUT = ("refine.refiners=[graphcut]", "refine.graphcut.iterations=30")  # long enough to interrupt


@pytest.fixture(scope="module")
def mapped_run(tmp_path_factory) -> Path:
    """A config whose run folder has a classifier and CAMs of 16 synthetic 64-px images; returns the config."""
    tmp = tmp_path_factory.mktemp("pools")
    cfg = {"name": "pools", "run_dir": str(tmp / "run"), "device": "cpu",
           "data": {"kind": "synthetic", "root": str(tmp / "data"),
                    "synthetic": {"n_train": N_TRAIN, "n_val": 4, "size": 64}},
           "classifier": {"backbone": "smallcnn", "pretrained": "none", "input_size": 64, "epochs": 1,
                          "batch_size": 8},
           "maps": {"methods": ["cam"], "scales": [1.0], "flip": False},
           "refine": {"refiners": ["crf", "graphcut"], "workers": "2"},
           "segmenter": {"enabled": False}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    for stage in ("train_classifier", "make_maps"):
        assert main([stage, "--config", str(path)]) == 0
    return path


def _cli(config: Path, *args: str, warm_opencv: bool = False, **popen) -> subprocess.Popen:
    """The CLI in a new Python process, optionally after warming OpenCV's thread pool and idling, as a user's
    own script (or a notebook) would before calling the pipeline."""
    warm = ("import time, numpy, cv2\n"
            "cv2.GaussianBlur(numpy.random.rand(2000, 2000).astype(numpy.float32), (0, 0), 5)\n"
            "time.sleep(2)\n") if warm_opencv else ""
    code = warm + "import sys\nfrom stages.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *args, "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _pngs(run: Path, refiner: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "refined" / refiner).glob("*.png"))}


def _run_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["run_dir"])


def test_refine_pool_finishes_after_the_parent_used_opencv_threads(mapped_run):
    """The hazard: the main process warmed OpenCV's thread pool and idled, then refine runs crf and graphcut on 2
    workers. It must finish, and give the same bytes as refining in the main process (workers: 1)."""
    proc = _cli(mapped_run, "refine", "--force", warm_opencv=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("refine with 2 workers hung after the main process used OpenCV's thread pool")
    assert proc.returncode == 0, err
    run = _run_dir(mapped_run)
    pooled = {r: _pngs(run, r) for r in ("crf", "graphcut")}
    assert all(len(files) == N_TRAIN for files in pooled.values())
    assert main(["refine", "--config", str(mapped_run), "--force", "--set", "refine.workers=1"]) == 0
    assert {r: _pngs(run, r) for r in pooled} == pooled


@pytest.fixture(scope="module")
def slow_graphcut(mapped_run) -> dict[str, bytes]:
    """The label maps of an uninterrupted slow graphcut refine."""
    assert main(["refine", "--config", str(mapped_run), "--force", "--set", *SLOW_GRAPHCUT]) == 0
    return _pngs(_run_dir(mapped_run), "graphcut")


def _workers_of(pid: int) -> list[int]:
    """The pool workers of process ``pid``: the children of its forkserver."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    children = [p for p, pp in parents.items() if pp == pid]
    return [p for p, pp in parents.items() if pp in children]


def _interrupt_refine(config: Path, sig: int, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, bytes]]:
    """Run refine in a new process; once its first graphcut image is written, send ``sig`` to every pool worker.
    Returns the process's result and the graphcut files that existed when the signal was sent."""
    run = _run_dir(config)
    proc = _cli(config, "refine", "--force", "--set", *SLOW_GRAPHCUT, *args)
    deadline = time.monotonic() + 180
    done: dict[str, bytes] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if any((run / "refined" / "graphcut").glob("*.png")):
            workers = _workers_of(proc.pid)
            if workers:
                for w in workers:
                    os.kill(w, sig)
                done = _pngs(run, "graphcut")
                break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=180)
    for w in _workers_of(proc.pid):  # stopped ones, if the process left any
        os.kill(w, signal.SIGKILL)
    assert done, "refine finished before a worker could be signalled"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), done


@pytest.mark.parametrize(("sig", "args", "message"), [
    (signal.SIGKILL, (), "refine graphcut: a worker process died"),
    (signal.SIGSTOP, ("refine.stall_timeout=3",), "refine graphcut: no image finished in 3 s"),
])
def test_a_worker_that_dies_or_stalls_ends_the_stage_and_the_finished_images_stay_done(mapped_run, slow_graphcut,
                                                                                      sig, args, message):
    run, clean = _run_dir(mapped_run), slow_graphcut
    result, done = _interrupt_refine(mapped_run, sig, *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    kept = _pngs(run, "graphcut")
    assert set(done) <= set(kept) and len(kept) < N_TRAIN
    assert all(kept[name] == clean[name] for name in kept)  # whole files, the same bytes as a clean run
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "refined" / "graphcut").glob("*.png")}
    assert main(["refine", "--config", str(mapped_run), "--set", *SLOW_GRAPHCUT]) == 0  # resumes
    assert _pngs(run, "graphcut") == clean
    assert all((run / "refined" / "graphcut" / n).stat().st_mtime_ns == t for n, t in mtimes.items())


def _exit_on(x: int) -> int:
    if x == 3:
        os._exit(1)
    return x


def _hang_on(x: int) -> int:
    if x == 3:
        time.sleep(3600)
    return x


def test_run_pool_reports_a_dead_or_stalled_worker():
    assert sorted(run_pool(abs, [-1, -2, 3], 2, what="t", stall_s=60)) == [1, 2, 3]
    with pytest.raises(WorkerFailed, match="t: a worker process died"):
        list(run_pool(_exit_on, range(6), 2, what="t", stall_s=60))
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match="t: no image finished in 1 s"):
        list(run_pool(_hang_on, [3], 2, what="t", stall_s=1))
    assert time.monotonic() - t0 < 30  # the stalled worker was terminated, not waited for


def test_a_worker_ignores_ctrl_c_from_its_start():
    """Ctrl-C reaches every process of the group; a worker still importing when it lands, before ``init_worker``
    ignores it, would print a traceback. Workers are born ignoring it: a worker started without ``init_worker``,
    in a process that handles Ctrl-C as a CLI does, already ignores SIGINT."""
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from concurrent.futures import ProcessPoolExecutor\n"
            "from pipeline.workers import worker_context\n"
            "with ProcessPoolExecutor(1, mp_context=worker_context()) as pool:\n"
            "    print(pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN)\n"
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]  # the worker ignores it; the main process still handles it


def test_every_refiner_is_deterministic_across_processes():
    """Each registered refiner, run in two pool workers (fresh processes) and here, gives the same bytes."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:40, :48]
    blob = np.exp(-((yy - 20) ** 2 + (xx - 18) ** 2) / 120.0).astype(np.float32)
    image[blob > 0.5] = (200, 40, 40)
    cases = [(name, blob) for name in REFINERS if not get_refiner(name).cache]
    here = [_refine_case(c) for c in cases]
    there = list(run_pool(_refine_case, cases, 2, what="t", stall_s=120))
    assert sorted(there) == sorted(here)
    assert len({label for _, label in here}) > 1  # the refiners differ: the comparison has teeth


def _refine_case(case: tuple[str, np.ndarray]) -> tuple[str, bytes]:
    name, blob = case
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    image[blob > 0.5] = (200, 40, 40)
    label = get_refiner(name).fn(np.stack([blob, 1.0 - blob]), np.array([0, 1]), image, False, RefineConfig())
    return name, label.tobytes()


def test_a_run_folder_is_used_by_one_process_at_a_time(mapped_run, caplog):
    run = _run_dir(mapped_run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.runfolder import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _cli(mapped_run, "make_maps")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert err.strip().splitlines() == [
            f"error: {run}: the run folder is in use by another wsss process (pid {holder.pid} on "
            f"{os.uname().nodename}); wait for it to finish, stop it, or choose another run_dir"]
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is taken over, with a warning naming it
    with caplog.at_level("WARNING"):
        assert main(["make_maps", "--config", str(mapped_run)]) == 0  # (up to date)
    assert f"taking over the lock left by pid {holder.pid} (no longer running)" in caplog.text
    assert (run / ".lock").read_text() == ""  # released cleanly

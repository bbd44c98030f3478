"""The run folder, the contract between stages: paths, atomic writes and up-to-date markers.

Every file is written to a temporary name in its folder and renamed into place, so an interrupted
stage never leaves a half-written file that a later stage would trust. ``<stage>.done.json`` records
the fingerprint of the stage's config sections and inputs; a stage whose fingerprint is unchanged is
skipped. ``<stage>.partial.json`` marks a stage under way: a rerun with the same fingerprint keeps the
per-item outputs already written, a rerun with another fingerprint starts that stage afresh.

The stages after a stage take its recorded identity as an input. A first run's identity is its fingerprint, so
the same config and inputs give the same identities in any run folder. A stage redone over its own finished
outputs (``--force``) gets a new identity, so that every stage that read those outputs becomes stale too.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import UserError

VOC_PALETTE_SIZE = 256


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (index i -> RGB), as a flat list of 768 ints for PIL."""
    palette = []
    for i in range(VOC_PALETTE_SIZE):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


TEMP_SUFFIX = ".tmp"  # atomic writes go to ``.<name>.<random>.tmp`` first


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename it into place: readers never see half a file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write the run folder ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # gone already after the rename


def remove_temp_files(folder: Path) -> None:
    """Delete the temp files of atomic writes that a killed process left behind anywhere under ``folder``."""
    for tmp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_label_png(path: Path, label: np.ndarray) -> None:
    """uint8 label map as a palette PNG (VOC colours, 255 = ignore)."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    atomic_write_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_figure(path: Path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def files_fingerprint(paths: Iterable[Path]) -> str:
    """Cheap fingerprint of input files: names, sizes and modification times."""
    entries = []
    for p in paths:
        st = Path(p).stat()
        entries.append((str(p), st.st_size, st.st_mtime_ns))
    return fingerprint(entries)


class Stage:
    """Bookkeeping of one stage in a run folder: skip when done, resume when partial, time it."""

    def __init__(self, run: Path, name: str, fp: str):
        self.run, self.name, self.fp = Path(run), name, fp
        self.done_path = self.run / f"{name}.done.json"
        self.partial_path = self.run / f"{name}.partial.json"

    @staticmethod
    def _record(path: Path) -> dict:
        """A marker's content; {} when it is missing or unreadable (a stage killed while writing it)."""
        try:
            return read_json(path) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    def is_done(self) -> bool:
        return self._record(self.done_path).get("fingerprint") == self.fp

    def begin(self, outputs: Iterable[Path] = (), fresh: bool = False) -> bool:
        """Start (or resume) the stage. Returns True when resuming a partial run with the same fingerprint.

        Starting afresh removes the stage's previous per-item outputs (``outputs``: folders) and
        marker, so nothing stale survives. ``fresh`` (``--force``) never resumes. Either way, the temp
        files of a killed run are removed: every finished file was renamed into place, so none is lost.
        """
        done, partial = self._record(self.done_path), self._record(self.partial_path)
        partial_identity = partial.get("identity", self.fp) if partial.get("fingerprint") == self.fp else None
        resuming = partial_identity is not None and not fresh
        if resuming:
            self.identity = partial_identity
        elif done.get("fingerprint") == self.fp or partial_identity not in (None, self.fp):
            # redoing outputs that later stages may have read (finished before, or an earlier redo interrupted)
            self.identity = f"{self.fp}.{secrets.token_hex(4)}"
        else:
            self.identity = self.fp
        self.done_path.unlink(missing_ok=True)
        remove_temp_files(self.run)
        if not resuming:
            for out in map(Path, outputs):
                if out.is_dir():
                    shutil.rmtree(out)
                else:
                    out.unlink(missing_ok=True)
            write_json(self.partial_path, {"fingerprint": self.fp, "identity": self.identity})
        self._t0 = time.perf_counter()
        return resuming

    def finish(self, **info: Any) -> None:
        elapsed = time.perf_counter() - self._t0
        identity = {} if self.identity == self.fp else {"identity": self.identity}
        write_json(self.done_path, {"fingerprint": self.fp, **identity, "seconds": round(elapsed, 2), **info})
        self.partial_path.unlink(missing_ok=True)


def stage_fingerprint(run: Path, name: str) -> str | None:
    """The recorded identity of a finished stage, an input of the stages after it: its fingerprint, with a
    token added when it was redone over its own outputs. None when the stage has not finished."""
    p = Path(run) / f"{name}.done.json"
    if not p.exists():
        return None
    rec = read_json(p)
    return rec.get("identity", rec.get("fingerprint"))


def stage_seconds(run: Path) -> dict[str, float]:
    out = {}
    for p in sorted(Path(run).glob("*.done.json")):
        out[p.name.removesuffix(".done.json")] = read_json(p).get("seconds", 0.0)
    return out


@contextmanager
def atomic_dir(path: Path) -> Callable[[], Path]:
    """Build a folder under a temp name and swap it into place at the end."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextmanager
def run_lock(run: Path) -> Any:
    """Hold ``<run>/.lock`` while stages write the run folder: one process at a time. A second process ends
    with one line naming the first one's pid. The lock is an ``flock`` on the file, which the kernel releases
    when its holder dies, so a lock left by a killed process is taken over (with a log line naming its pid)."""
    run = Path(run)
    path = run / LOCK_NAME
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"{run}: cannot write the run folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise UserError(f"{run}: the run folder is in use by another wsss process ({who}); wait for it to "
                            f"finish, stop it, or choose another run_dir") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").split()
        if previous and previous[0].isdigit() and int(previous[0]) != os.getpid():
            state = "no longer running" if not _alive(int(previous[0])) else "which no longer holds it"
            logging.getLogger(__name__).warning("%s: taking over the lock left by pid %s (%s)", path, previous[0],
                                                state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # releases the flock

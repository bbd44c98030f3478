"""The run folder, the contract between stages: paths, atomic writes and up-to-date markers.

Every file is written to a temporary name in its folder and renamed into place, so an interrupted
stage never leaves a half-written file that a later stage would trust. ``<stage>.done.json`` records
the fingerprint of the stage's config sections and inputs; a stage whose fingerprint is unchanged is
skipped. ``<stage>.partial.json`` marks a stage under way: a rerun with the same fingerprint keeps the
per-item outputs already written, a rerun with another fingerprint starts that stage afresh.

The stages after a stage take its recorded identity as an input. A first run's identity is its fingerprint, so
the same config and inputs give the same identities in any run folder. A stage redone over its own finished
outputs (``--force``) gets a new identity, so that every stage that read those outputs becomes stale too.
A stage whose outputs later stages read apart (one map method's maps, one refiner's label set) records an identity
for each such part too, made the same way from the inputs of that part alone: a later stage that reads one part
takes that part's identity, and a change to another part leaves it current. An input of outputs that no later
stage reads (``export.images``: links or copies) makes the stage stale and leaves its identities alone.
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


def _made_from(identity: str | None) -> str | None:
    """The fingerprint an identity was made from (an identity is a fingerprint, ``<fingerprint>.<token>`` when
    redone)."""
    return identity.split(".", 1)[0] if identity else None


class Stage:
    """Bookkeeping of one stage in a run folder: skip when done, resume when partial, time it.

    ``fp``: the fingerprint of the stage's inputs. ``parts``: part name -> the fingerprint of the inputs of that part
    of its outputs, for parts that later stages read apart (each gets an identity of its own; ``fp`` need not repeat
    them). ``local``: inputs of outputs that no later stage reads; they make the stage stale and are left out of
    its identities. ``self.fp`` is the whole: the fingerprint that ``<stage>.done.json`` records."""

    def __init__(self, run: Path, name: str, fp: str, parts: dict[str, str] | None = None, local: Any = None):
        self.run, self.name = Path(run), name
        self.parts = dict(parts or {})
        self.base = fingerprint(fp, self.parts) if self.parts else fp  # what the stage's identity is made from
        self.fp = fingerprint(self.base, local) if local is not None else self.base
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

        Identities: a resumed run keeps those it began with. A run redoing outputs that later stages may have read
        (over the finished outputs of the same inputs, with ``fresh`` over outputs of the same identity-making
        inputs, or after such a redo was interrupted) gets a new token on every identity. Any other run gives each
        identity whose inputs are unchanged the one it had (a rerun for another part or a ``local`` input), and
        each other its fingerprint.
        """
        done, partial = self._record(self.done_path), self._record(self.partial_path)
        partial_identity = partial.get("identity", self.base) if partial.get("fingerprint") == self.fp else None
        resuming = partial_identity is not None and not fresh
        previous = partial if resuming else done or partial
        if resuming:
            token = None  # the identities recorded when it began, all made from these fingerprints
        elif (done.get("fingerprint") == self.fp or partial_identity not in (None, self.base)
              or fresh and _made_from(previous.get("identity", previous.get("fingerprint"))) == self.base):
            token = secrets.token_hex(4)  # redoing outputs that later stages may have read
        else:
            token = None
        self.identity, self.part_identities = self._identities(token, previous)
        self.done_path.unlink(missing_ok=True)
        remove_temp_files(self.run)
        if not resuming:
            for out in map(Path, outputs):
                if out.is_dir():
                    shutil.rmtree(out)
                else:
                    out.unlink(missing_ok=True)
            write_json(self.partial_path, {"fingerprint": self.fp, "identity": self.identity,
                                           **({"parts": self.part_identities} if self.parts else {})})
        self._t0 = time.perf_counter()
        return resuming

    def _identities(self, token: str | None, previous: dict) -> tuple[str, dict[str, str]]:
        """The stage's identity and its parts': ``<fingerprint>.<token>`` with a token, else the identity recorded
        in ``previous`` where it was made from the same fingerprint, else the fingerprint."""
        def one(fp: str, before: str | None) -> str:
            if token:
                return f"{fp}.{token}"
            return before if before and _made_from(before) == fp else fp

        before = previous.get("parts") or {}
        return (one(self.base, previous.get("identity", previous.get("fingerprint"))),
                {part: one(fp, before.get(part)) for part, fp in self.parts.items()})

    def finish(self, **info: Any) -> None:
        elapsed = time.perf_counter() - self._t0
        identity = {} if self.identity == self.fp else {"identity": self.identity}
        parts = {"parts": self.part_identities} if self.parts else {}
        write_json(self.done_path, {"fingerprint": self.fp, **identity, **parts, "seconds": round(elapsed, 2),
                                    **info})
        self.partial_path.unlink(missing_ok=True)


def stage_fingerprint(run: Path, name: str, part: str | None = None) -> str | None:
    """The recorded identity of a finished stage, an input of the stages after it: its fingerprint, with a
    token added when it was redone over its own outputs. With ``part``, the identity of that part of its outputs
    (the stage's own where it recorded none: a marker from before it had parts). None when the stage has not
    finished."""
    p = Path(run) / f"{name}.done.json"
    if not p.exists():
        return None
    rec = read_json(p)
    identity = rec.get("identity", rec.get("fingerprint"))
    return identity if part is None else (rec.get("parts") or {}).get(part, identity)


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

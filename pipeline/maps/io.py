"""Map files: ``maps/<method>/<id>.npz`` with float16 maps [K,H,W] for the image's K classes.

Keys: ``maps`` (float16, in [0, 1]), ``classes`` (the K foreground class indices), ``class_names``
(the classifier's full class list, so a file made with another class list is caught on reading).
"""

from __future__ import annotations

import zipfile
from itertools import zip_longest
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.runfolder import save_npz


def save_maps(path: Path, maps: np.ndarray, classes: np.ndarray, class_names: list[str]) -> None:
    save_npz(path, maps=maps.astype(np.float16), classes=np.asarray(classes, dtype=np.int16),
             class_names=np.asarray(class_names))


def load_maps(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (maps float32 [K,H,W] in [0,1], classes int [K]). A damaged file, one made with another class
    list, or one holding NaN or infinite values is a ``DataError`` naming the file."""
    try:
        with np.load(path) as f:
            maps, classes, names = f["maps"], f["classes"], [str(n) for n in f["class_names"]]
    except FileNotFoundError:
        raise DataError(f"{path}: map file not found (run the make_maps stage)") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable map file ({exc}); rerun make_maps with --force") from None
    if names != list(class_names):
        theirs, ours = next((a, b) for a, b in zip_longest(names, class_names) if a != b)
        raise DataError(f"{path}: made with another class list ({theirs!r} where the dataset has {ours!r}); "
                        "rerun make_maps with --force")
    if not np.isfinite(maps).all():
        raise DataError(f"{path}: the maps hold NaN or infinite values; rerun make_maps with --force, and if "
                        "they come back, retrain the classifier (check train_log.json for a diverged loss)")
    return maps.astype(np.float32), classes.astype(np.int64)

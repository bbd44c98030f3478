"""Map files: ``maps/<method>/<id>.npz`` with float16 maps [K,H,W] for the image's K classes.

Keys: ``maps`` (float16, in [0, 1]), ``classes`` (the K foreground class indices), ``class_names``
(the classifier's full class list, so a file made with another class list is caught on reading).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.runfolder import save_npz


def save_maps(path: Path, maps: np.ndarray, classes: np.ndarray, class_names: list[str]) -> None:
    save_npz(path, maps=maps.astype(np.float16), classes=np.asarray(classes, dtype=np.int16),
             class_names=np.asarray(class_names))


def load_maps(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (maps float32 [K,H,W] in [0,1], classes int [K]); NaNs become 0."""
    try:
        with np.load(path) as f:
            maps, classes, names = f["maps"], f["classes"], list(f["class_names"])
    except FileNotFoundError:
        raise DataError(f"{path}: map file not found (run the make_maps stage)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable map file ({exc})") from None
    if names != list(class_names):
        raise DataError(f"{path}: made with another class list ({len(names)} classes, expected "
                        f"{len(class_names)}); rerun make_maps with --force")
    return np.nan_to_num(maps.astype(np.float32), nan=0.0), classes.astype(np.int64)

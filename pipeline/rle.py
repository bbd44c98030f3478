"""COCO run-length encoding (RLE), the pycocotools format of a binary mask, in a module of its own: the COCO reader
(``pipeline/data/coco.py``) decodes it and the COCO export (``pipeline/formats/coco.py``) encodes it, and neither
imports the other.

A mask of size [h, w] is read in column-major order (down each column, then the next column) as runs of equal
values, the first run being zeros (maybe of length 0). ``counts`` is that list of run lengths, or its compressed
form: a string in which each count (from the third on, minus the count two before it) is written in little-endian
groups of 5 bits, bit 6 set while more groups follow, each group + 48 as a character (pycocotools' ``rleToString``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary HxW mask in column-major order, starting with a run of zeros (maybe empty)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat.size and flat[0] else counts


def rle_string(counts: list[int]) -> str:
    """The COCO API's compressed form of run lengths: each count (from the third on, minus the count two before
    it) in little-endian groups of 5 bits, bit 6 set while more groups follow, each group + 48 as a character."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        while True:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends at -1
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + (0x20 if more else 0) + 48))
            if not more:
                break
    return "".join(out)


def rle_from_string(s: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (the inverse of :func:`rle_string`); a ``ValueError`` when
    the string is not one."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, shift, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("the RLE string ends inside a count")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} is not in the RLE alphabet")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift  # sign extension
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``counts`` a compressed string or a list of run lengths; ``size`` [h, w]) as a bool HxW mask; a
    ``ValueError`` saying what is wrong when it is not a valid one."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"its run lengths cover {sum(counts)} pixels, not {h}x{w} = {h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((w, h)).T


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask as COCO compressed RLE: ``{"size": [h, w], "counts": str}``."""
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_string(rle_counts(mask))}

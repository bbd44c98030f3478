"""Tensor helpers the map methods share: bounded-memory chunks, and Score-CAM's upsampled, min-max normalised
channels (``scorecam`` and ``stem_basis`` both use them)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of at most ``size`` (at least 1) rows covering ``range(n)``: how the methods bound their memory."""
    size = max(1, size)
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def upsampled_channels(acts: torch.Tensor, b: torch.Tensor, k: torch.Tensor,
                       size: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels ``acts[b, k]`` bilinearly upsampled to ``size`` -> (U [R,1,H,W], their min lo [R,1,1,1], their
    range hi - lo [R,1,1,1], at least the smallest float): the min-max normalisation of Score-CAM's masks,
    s(U(A)) = (U - lo) / range, that its masked inputs (``scorecam``) and the stem basis share."""
    up = F.interpolate(acts[b, k][:, None], size=size, mode="bilinear", align_corners=False)
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    return up, lo, (hi - lo).clamp_min(torch.finfo(up.dtype).tiny)  # a map flattened by U gives H = 0

"""Training and evaluation transforms (albumentations), applied to HxWx3 uint8 RGB images."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch


def classifier_train_transform(size: int, mean, std) -> A.Compose:
    """Random scale (0.7-1.3 of the fitted size), pad, random crop, flip, colour jitter, normalise."""
    return A.Compose([
        A.LongestMaxSize(max_size=size),
        A.RandomScale(scale_limit=(-0.3, 0.3), p=1.0),
        A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.RandomCrop(height=size, width=size),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ])


def classifier_eval_transform(size: int, mean, std) -> A.Compose:
    return A.Compose([
        A.LongestMaxSize(max_size=size),
        A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ])


def to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def segmenter_train_transform(size: int, crop: int, scale_range: tuple[float, float], mean, std,
                              ignore: int = 255) -> A.Compose:
    """Joint image/mask augmentation: fit the longest side to ``size``, random scale, pad (mask: ignore),
    random ``crop``, flip, colour jitter, normalise. Masks are resampled with nearest neighbours."""
    lo, hi = scale_range
    return A.Compose([
        A.LongestMaxSize(max_size=size),
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0),
        A.PadIfNeeded(min_height=crop, min_width=crop, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore),
        A.RandomCrop(height=crop, width=crop),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.5),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ])


def segmenter_eval_transform(size: int, mean, std) -> A.Compose:
    """Fit the longest side to ``size`` and normalise (predictions are resized back to the image)."""
    return A.Compose([A.LongestMaxSize(max_size=size), A.Normalize(mean=mean, std=std, max_pixel_value=255.0)])

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

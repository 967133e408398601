"""Train and eval presets over uint8 CHW tensors already at the model's input size.

Resizing happens once, at decode time (shards.decode_image); the presets then only augment and
normalise, as torchvision's references/classification/presets.py does.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_preset(image_size: int, augment: bool = True) -> v2.Compose:
    """Rotation +-15 deg, horizontal flip p=0.5, colour jitter (0.2, 0.2, 0.2, 0.1), normalise."""
    steps: list[v2.Transform] = [v2.Resize((image_size, image_size), antialias=True)]
    if augment:
        steps += [
            v2.RandomRotation(15),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
        ]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def eval_preset(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

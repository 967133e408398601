"""The one training recipe: plain PyTorch epochs and evaluation, shared by every backbone.

No Ray and no Opacus here: privacy wraps the objects handed in, transport lives elsewhere.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float


@dataclass
class Predictions:
    """Class probabilities and true labels over a whole evaluation set, plus the mean loss."""

    probs: np.ndarray
    labels: np.ndarray
    loss: float


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse class frequency of a hospital's own shard, n / (k * n_c); absent classes get 1."""
    counts = counts.to(torch.float32)
    k = len(counts)
    weights = counts.sum() / (k * counts.clamp(min=1))
    weights[counts == 0] = 1.0
    return weights


def make_loss(counts: torch.Tensor | None, label_smoothing: float) -> nn.CrossEntropyLoss:
    weight = class_weights(counts) if counts is not None else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    *,
    grad_clip: float | None = None,
    amp: bool = False,
    channels_last: bool = False,
    proximal: tuple[float, list[torch.Tensor]] | None = None,
) -> EpochStats:
    """One pass over the loader. `proximal` = (mu, anchors) adds FedProx's
    mu/2 * ||w - w_anchor||^2 over the trainable parameters, in their order."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad] if proximal else []
    start = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images = _to_device(images, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        if proximal:
            mu, anchors = proximal
            loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        n = labels.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
    return EpochStats(
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        samples=seen,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> Predictions:
    """Unweighted cross-entropy and softmax probabilities over the whole loader."""
    model.eval()
    probs, labels, total_loss, seen = [], [], 0.0, 0
    for images, target in loader:
        images = _to_device(images, device, channels_last)
        target = target.to(device)
        with _autocast(device, amp):
            logits = model(images).float()
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        seen += target.shape[0]
        probs.append(torch.softmax(logits, 1).cpu())
        labels.append(target.cpu())
    return Predictions(
        probs=torch.cat(probs).numpy() if probs else np.zeros((0, 0)),
        labels=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        loss=total_loss / max(seen, 1),
    )

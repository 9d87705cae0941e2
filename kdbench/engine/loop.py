"""One training epoch and one evaluation pass over in-memory uint8 tensors."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdbench.config import LossConfig
from kdbench.data.presets import Augmentation, normalize
from kdbench.engine.metrics import confusion_matrix, summarize
from kdbench.engine.runtime import autocast, memory_format
from kdbench.errors import NonFiniteError
from kdbench.methods import Method


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    terms: dict[str, float]

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's shuffling, views and dropout: a resumed run replays the same epoch."""
    return seed * 100_003 + epoch


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (the partial last batch is dropped: batch norm on a handful of
    samples at low resolution gives exploding gradients); one batch when ``n < batch_size``."""
    return max(n // batch_size, 1 if n >= 2 else 0)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base LR at ``step``.

    A linear warm-up over ``warmup_steps`` (from 1/25 of the base LR), then ``cosine``
    decay to 0, ``onecycle`` (warm-up over 30% of the steps, then cosine down; it
    ignores ``warmup_steps``) or ``constant``.
    """
    if schedule == "onecycle":
        warmup_steps = int(0.3 * total_steps)
    if step < warmup_steps:
        return 0.04 + 0.96 * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_one_epoch(
    model: nn.Module,
    method: Method,
    loss_cfg: LossConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    aug: Augmentation,
    teacher,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
    desc: str,
    progress: bool,
) -> EpochStats:
    """Train over ``images`` (uint8, already on ``device``) once; stops with NonFiniteError on a NaN/inf loss."""
    model.train()
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    torch.manual_seed(epoch_seed(seed, epoch))  # dropout masks
    n = len(images)
    order = torch.randperm(n, generator=generator)
    views = aug.sample_views(n, generator)
    fmt = memory_format(device)
    total_loss, correct, seen = 0.0, 0, 0
    term_sums: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    for lo in range(0, steps_per_epoch(n, batch_size) * batch_size, batch_size):
        positions = order[lo : lo + batch_size]
        batch_views = views[lo : lo + batch_size]
        dev_positions = positions.to(device)
        x = normalize(aug(images[dev_positions], batch_views, generator)).contiguous(memory_format=fmt)
        y = labels[dev_positions]
        with autocast(device):
            logits = model(x)
        logits = logits.float()
        teacher_logits = teacher(positions, batch_views, x) if teacher is not None else None
        loss, terms = method.loss(logits, teacher_logits, y, loss_cfg)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss ({loss.item()}) at epoch {epoch + 1}: lower the learning rate or check the teacher and data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        b = len(positions)
        total_loss += loss.item() * b
        correct += int((logits.argmax(1) == y).sum())
        seen += b
        for name, value in terms._asdict().items():
            if value is not None:
                term_sums[name] = term_sums.get(name, 0.0) + value.item() * b
        elapsed = time.perf_counter() - start
        bar.update(b)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / elapsed:.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    seen = max(seen, 1)
    return EpochStats(total_loss / seen, correct / seen, seen, seconds, {k: v / seen for k, v in term_sums.items()})


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: list[str], *, batch_size: int, device: torch.device) -> dict:
    """Metrics of ``model`` on un-augmented ``images`` plus the mean cross-entropy (``loss``)."""
    model.eval()
    predictions, loss_sum = [], 0.0
    fmt = memory_format(device)
    for lo in range(0, len(images), batch_size):
        x = normalize(images[lo : lo + batch_size].to(device)).contiguous(memory_format=fmt)
        with autocast(device):
            logits = model(x).float()
        y = labels[lo : lo + batch_size].to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        predictions.append(logits.argmax(1).cpu())
    pred = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    metrics = summarize(confusion_matrix(labels.cpu(), pred, len(classes)), classes)
    metrics["loss"] = loss_sum / max(len(images), 1)
    return metrics

"""One trial's files and records: its result, provenance, teacher source, ``best.pt`` (trained by :mod:`kdbench.engine.runner`).

Files in a trial's output folder:

- ``manifest.csv``: every image used, with its class and split;
- ``best.pt``: the weights with the best validation accuracy (a kdbench checkpoint of the plain
  torchvision model, a packed member's included) and their provenance: digests of the split
  manifest, dataset and recipe, and the training images' paths, so a KD student can refuse a
  teacher that has seen its validation or test images;
- ``metrics.json``: the result: test metrics (with per-image predictions) of the
  best-on-validation and of the last-epoch weights, per-epoch history, timings, environment;
- ``test_logits.pt``: the best-on-validation weights' logits on the test split, with the targets;
- ``state.pt`` (in the first trial's folder of a run; :mod:`kdbench.engine.runner`): the resume
  state after the last finished epoch.

:func:`kdbench.engine.runner.run_trial` trains one trial with the runner (which trains every trial,
alone or packed), so rerunning it into the same folder resumes after the last finished epoch and a folder holding
a different trial (another config, dataset or teacher) is refused; see the runner for resume
and for the checks that fail a trial (NaN/inf, exploding loss, a teacher at chance level).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from kdbench.advice import command
from kdbench.config import Recipe, TrialConfig
from kdbench.data.prepare import PreparedData
from kdbench.data.presets import AUGMENTATIONS
from kdbench.digest import checkpoint_digest, json_digest
from kdbench.durable import atomic_torch_save
from kdbench.engine import RESULTS_VERSION
from kdbench.engine.feature_cache import LAYOUT, cache_bytes, feature_arrays, fits, storage_dtype
from kdbench.engine.loop import EpochStats, evaluate, logit_metrics, lr_factor, predict, steps_per_epoch
from kdbench.engine.metrics import chance_test
from kdbench.engine.runtime import environment, layout, memory_format
from kdbench.engine.teacher import CachedTeacher, OnlineTeacher, cache_path, cached_teacher
from kdbench.errors import UserError
from kdbench.losses import LOSS_VERSION
from kdbench.methods import teacher_features
from kdbench.models import load_model_checkpoint, save_checkpoint
from kdbench.records import RESULT_FORMAT, TrialResult, from_json
from kdbench.stages import check_pair, uses_stages

METRICS_FILE = "metrics.json"
TEST_LOGITS_FILE = "test_logits.pt"  # the best-val checkpoint's logits on the test split
PROVENANCE_FORMAT = "kdbench-provenance-v1"


def with_fingerprint(cfg: TrialConfig, data: PreparedData) -> TrialConfig:
    """``cfg`` with the data's fingerprint filled in; one planned with another fingerprint is refused."""
    if cfg.dataset_fingerprint is None:
        return dataclasses.replace(cfg, dataset_fingerprint=data.fingerprint)
    if cfg.dataset_fingerprint != data.fingerprint:
        raise UserError(
            f"the image files of {cfg.data.dataset} under {data.folder} changed since this trial was planned "
            f"(fingerprint {data.fingerprint}, planned {cfg.dataset_fingerprint}): rerun the sweep to plan it anew"
        )
    return cfg


def resume_identity(cfg: TrialConfig, teacher_info: dict | None) -> str:
    """What a folder's resume state must match: the trial's identity and the teacher's content digest."""
    return json.dumps({"trial": cfg.identity(), "teacher_digest": teacher_info and teacher_info["digest"]}, sort_keys=True)


def provenance(cfg: TrialConfig, data: PreparedData, teacher_info: dict | None) -> dict:
    """What a checkpoint records of its training: dataset, split manifest and recipe digests, the training images.

    Paths are relative to the dataset folder, so a student can count exactly how many of
    its validation and test images a teacher checkpoint was trained on.
    """
    recipe = dataclasses.asdict(cfg.recipe)
    recipe.pop("eval_batch_size")
    return {
        "format": PROVENANCE_FORMAT,
        "trial_key": cfg.key(),
        "dataset": cfg.data.dataset,
        "data": dataclasses.asdict(cfg.data),
        "dataset_fingerprint": data.fingerprint,
        "manifest": data.manifest_digest(),
        "recipe": json_digest(recipe),
        "train_paths": data.paths("train"),
        "teacher": teacher_info and teacher_info["digest"],
    }


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, n_train: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's per-step schedule (warm-up, then cosine / one-cycle / constant) over all epochs."""
    steps = max(1, steps_per_epoch(n_train, recipe.batch_size))
    total_steps, warmup_steps = steps * recipe.epochs, steps * recipe.warmup_epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe.schedule, step, total_steps, warmup_steps))


def history_row(epoch: int, stats: EpochStats, val: dict, lr: float) -> dict:
    """One epoch of a run's history: training loss, accuracy and loss terms, validation metrics, LR, speed."""
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": lr,
        "images_per_s": stats.images_per_s,
        "seconds": stats.seconds,
        **{f"term_{k}": v for k, v in stats.terms.items()},
    }


def build_result(
    cfg: TrialConfig,
    data: PreparedData,
    teacher_info: dict | None,
    last_model: torch.nn.Module,
    best_checkpoint: Path,
    best_epoch: int,
    history: list[dict],
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    t0: float,
    device: torch.device,
    parts: torch.nn.Module | None = None,
) -> TrialResult:
    """A trial's result: val and test metrics of the best-on-validation checkpoint and of the last weights, and its record.

    The test metrics carry the per-image ``predictions`` (class indices, in the order of ``test_targets``), so
    the report can pair two trials image by image; the best checkpoint's test logits are saved beside it
    (:data:`TEST_LOGITS_FILE`).  ``parts``, the method's learnable parts, are counted apart from the model.
    NaN/inf logits (or weights in ``best_checkpoint``) raise a NonFiniteError.
    """
    batch_size = cfg.recipe.eval_batch_size
    test_images, test_labels = sets["test"]

    def split_metrics(model: torch.nn.Module, weights: str) -> tuple[dict, torch.Tensor]:
        what = f"validation logits of {weights}"
        val = evaluate(model, *sets["val"], data.classes, batch_size=batch_size, device=device, what=what)
        logits = predict(model, test_images, batch_size=batch_size, device=device, what=f"test logits of {weights}")
        test = logit_metrics(logits, test_labels, data.classes) | {"predictions": logits.argmax(1).tolist()}
        return {"val": val, "test": test}, logits

    best_model, _ = load_model_checkpoint(best_checkpoint)
    best_weights = f"the best-on-validation weights (epoch {best_epoch})"
    best, best_logits = split_metrics(best_model.to(device, memory_format=memory_format(device)), best_weights)
    last, _ = split_metrics(last_model, f"the last-epoch weights (epoch {cfg.recipe.epochs})")
    atomic_torch_save({"logits": best_logits, "targets": test_labels.cpu()}, best_checkpoint.parent / TEST_LOGITS_FILE)
    val_labels = sets["val"][1].cpu()
    majority = float(torch.bincount(val_labels, minlength=len(data.classes)).max()) / max(len(val_labels), 1)
    result = {
        "format": RESULT_FORMAT,
        "key": cfg.key(),
        "loss_version": LOSS_VERSION,
        "results_version": RESULTS_VERSION,
        "config": cfg.identity(),
        "effective_loss": dataclasses.asdict(cfg.loss),  # as TrialConfig settled it
        "classes": data.classes,
        "data": {"folder": str(data.folder), **data.counts(), "skipped": data.index.skipped},
        "teacher": teacher_info,
        "test_targets": test_labels.cpu().tolist(),
        "best": {"epoch": best_epoch, **best, "test_logits_file": TEST_LOGITS_FILE},
        "chance": {
            **chance_test(best["val"]["accuracy"], len(val_labels), max(1 / len(data.classes), majority)),
            "allowed": cfg.allow_chance_teacher,
        },
        "last": {"epoch": cfg.recipe.epochs, **last},
        "history": history,
        "timings": {
            "total_s": time.perf_counter() - t0,
            "train_s": sum(h["seconds"] for h in history),
            "train_images_per_s": sum(h["images_per_s"] for h in history) / max(len(history), 1),
        },
        "environment": environment(device),
        "method_parts": None if parts is None else {"parameters": sum(p.numel() for p in parts.parameters())},
    }
    return from_json(TrialResult, result, f"the result of trial {result['key']}")


def teacher_source(
    cfg: TrialConfig, needs: frozenset[str], data: PreparedData, train_images: torch.Tensor, device: torch.device, log
):
    """The teacher's outputs for a KD trial, providing ``needs`` (:data:`kdbench.methods.NEEDS`), and a record of it.

    Where the augmentation is a finite view group: the logit cache, and the feature cache for the features
    ``needs`` names (:mod:`kdbench.engine.feature_cache`) unless it would not fit; the teacher online
    otherwise (the record says why).

    Raises:
        UserError: no teacher checkpoint, one of other classes, without provenance (unless trusted) or trained on
            this run's held-out images, or stage features asked of a pair whose stages cannot be matched
            (:func:`kdbench.stages.check_pair`).
    """
    if not needs:
        return None, None
    if not cfg.teacher_checkpoint:
        raise UserError(f"method {cfg.method} distils from a teacher: pass --teacher CHECKPOINT (a best.pt of a teacher run)")
    path = Path(cfg.teacher_checkpoint)
    model, ckpt = load_model_checkpoint(path)
    if ckpt["classes"] != data.classes:
        raise UserError(
            f"teacher {path} was trained on classes {ckpt['classes'][:3]}... ({len(ckpt['classes'])}), "
            f"this run has {data.classes[:3]}... ({len(data.classes)}): use a teacher of the same dataset and class subset"
        )
    if uses_stages(needs):
        check_pair(cfg.method, ckpt["model"], cfg.recipe.model, cfg.data.resolution)
    record = check_teacher_provenance(cfg, path, ckpt.get("provenance"), data)
    model = model.to(device, memory_format=memory_format(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    aug = AUGMENTATIONS[cfg.data.augment]
    digest = checkpoint_digest(path)
    info = {"checkpoint": str(path), "model": ckpt["model"], "id": cfg.teacher_id or digest, "digest": digest, **record}
    features = sorted(teacher_features(needs))
    online = OnlineTeacher(model, str(path), needs, ckpt["model"])
    if features:  # stage features' layout changes a loss's rounding: the cache's (NCHW) is not the online teacher's
        info["feature_memory_format"] = layout(device)
    if not aug.cacheable:
        return _online(online, info, f"augmentation {aug.name} is continuous", log)
    cache = cache_path(path, digest, data.digests_of("train"), cfg.data.resolution, aug, device)
    if features:
        shapes = online.feature_shapes(cfg.data.resolution, device)
        too_big = fits(cache_bytes(len(train_images), len(aug.views), shapes, storage_dtype()), cache.parent)
        if too_big:
            return _online(online, info, too_big, log)
    t0 = time.perf_counter()
    batch = cfg.recipe.eval_batch_size
    teacher: CachedTeacher = cached_teacher(model, cache, train_images, aug, batch_size=batch, device=device, source=str(path))
    extra = {}
    if features:
        arrays = feature_arrays(
            model, ckpt["model"], cache, features, train_images, aug, batch_size=batch, device=device, source=str(path)
        )
        teacher = CachedTeacher(teacher.logits, aug.views, arrays)
        extra = {
            "feature_memory_format": LAYOUT,
            "features": {
                name: {"shape": list(a.shape[2:]), "dtype": str(a.dtype), "file": str(a.filename)} for name, a in arrays.items()
            },
            "feature_cache_bytes": sum(a.nbytes for a in arrays.values()),
        }
    return teacher, {**info, "mode": "cache", "cache": str(cache), "cache_load_s": time.perf_counter() - t0, **extra}


def _online(teacher: OnlineTeacher, info: dict, why: str, log) -> tuple[OnlineTeacher, dict]:
    log(f"{why}: running the teacher online")
    return teacher, {**info, "mode": "online", "why": why}


def check_teacher_provenance(cfg: TrialConfig, path: Path, prov: dict | None, data: PreparedData) -> dict:
    """Refuse a teacher trained on this run's validation or test images, or one without provenance
    (unless ``cfg.trust_teacher``); returns the result's record of the teacher's provenance."""
    if prov is None:
        if not cfg.trust_teacher:
            raise UserError(
                f"teacher {path} has no provenance record (an older or foreign checkpoint), so kdbench cannot check that "
                "it never saw this run's validation and test images: retrain it with this kdbench "
                f"({command('train', '--out', 'DIR')} without --teacher and --method, with this run's data settings), "
                "or pass --trust-teacher "
                "to use it anyway (recorded in the result)"
            )
        return {"provenance": None, "trusted_without_provenance": True}
    held_out = set(data.paths("val", "test"))
    overlap = held_out.intersection(prov["train_paths"])
    if overlap:
        seed = cfg.data.split_seed
        raise UserError(
            f"teacher {path} was trained on {len(overlap)} of this run's {len(held_out)} validation/test images "
            f"(teacher: {prov['dataset']} split seed {prov['data']['split_seed']}; this run: split seed {seed}): "
            f"train the teacher with --split-seed {seed} and this run's data settings, or pass a teacher of this split"
        )
    resolution = check_teacher_resolution(cfg, path, prov)
    keep = ("trial_key", "dataset", "dataset_fingerprint", "manifest", "recipe")
    return {"provenance": {k: prov[k] for k in keep}, "trusted_without_provenance": False, **resolution}


def check_teacher_resolution(cfg: TrialConfig, path: Path, prov: dict) -> dict:
    """Refuse a teacher trained at another resolution than ``cfg``'s (unless ``cfg.allow_teacher_resolution``).

    A teacher's training resolution is in its checkpoint's provenance (``data.resolution``); one trained at 64 px
    and used at 32 px loses a third of its accuracy, with nothing else to show for it.  Returns the record of it.

    Raises:
        UserError: the resolutions differ and the mismatch was not asked for.
    """
    trained, used = prov["data"]["resolution"], cfg.data.resolution
    if trained != used and not cfg.allow_teacher_resolution:
        raise UserError(
            f"teacher {path} was trained at {trained} px, this run is at {used} px: train the teacher at --resolution "
            f"{used}, run at --resolution {trained}, or pass --allow-teacher-resolution to use it anyway (recorded)"
        )
    return {"trained_resolution": trained, "resolution_mismatch_allowed": trained != used}


def save_best(path: Path, model, model_name: str, classes: list[str], extra: dict, epoch: int) -> None:
    """``best.pt``: the weights of ``epoch`` with their record (``extra``: the trial identity, the provenance)."""
    save_checkpoint(path, model, model_name=model_name, classes=classes, extra={**extra, "epoch": epoch})

"""Run one trial end to end: data, model, (teacher), epochs, checkpoints, test metrics.

Files in the trial's output folder:

- ``manifest.csv``: every image used, with its class and split;
- ``last.pt``: resume state after the last finished epoch (weights, optimiser, history);
- ``best.pt``: the weights with the best validation accuracy (a kdbench checkpoint) and their
  provenance: digests of the split manifest, dataset and recipe, and the training images'
  paths, so a KD student can refuse a teacher that has seen its validation or test images;
- ``metrics.json``: the result: test metrics (with per-image predictions) of the
  best-on-validation and of the last-epoch weights, per-epoch history, timings, environment;
- ``test_logits.pt``: the best-on-validation weights' logits on the test split, with the targets.

Rerunning the same trial into the same folder resumes after the last finished
epoch; a folder holding a different trial (another config, dataset or teacher) is refused.
Each epoch writes ``last.pt`` before ``best.pt`` (both atomic and fsynced): killed between
the two, the resumed run rewrites ``best.pt`` from ``last.pt``, whose weights are that best
epoch's.  An unreadable ``last.pt`` restarts the trial from scratch, with a warning in the log.

A run fails (UserError) when its loss becomes NaN/inf or explodes (an epoch's mean over
100x the first epoch's), and a teacher fails when its validation accuracy is not
significantly above chance (see :func:`kdbench.engine.metrics.chance_test`).  A NaN/inf
in the model's weights or buffers after an epoch's training, in its validation or test
logits, or in a checkpoint it loads (teacher, ``best.pt``, ``last.pt``) fails it too
(NonFiniteError, naming the tensor and the epoch; :mod:`kdbench.finite`): such
weights are never saved, selected as the best, or scored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdbench.config import Recipe, TrialConfig
from kdbench.data.prepare import PreparedData, prepare_data
from kdbench.data.presets import AUGMENTATIONS
from kdbench.data.specs import display_name
from kdbench.digest import file_sha256, json_digest
from kdbench.durable import atomic_torch_save, atomic_write_json, remove_stale_temps
from kdbench.engine import RESULTS_VERSION
from kdbench.engine.loop import (
    EpochStats,
    check_loss_growth,
    evaluate,
    logit_metrics,
    lr_factor,
    make_optimizer,
    predict,
    steps_per_epoch,
    train_one_epoch,
)
from kdbench.engine.metrics import chance_test
from kdbench.engine.runtime import environment, memory_format, resolve_device
from kdbench.engine.teacher import CachedTeacher, OnlineTeacher, cache_path, cached_teacher
from kdbench.errors import UserError, one_line
from kdbench.finite import check_finite_state
from kdbench.losses import LOSS_VERSION
from kdbench.methods import get_method
from kdbench.models import (
    CHECKPOINT_FORMAT,
    build_model,
    load_model_checkpoint,
    save_checkpoint,
)

METRICS_FILE = "metrics.json"
TEST_LOGITS_FILE = "test_logits.pt"  # the best-val checkpoint's logits on the test split
PROVENANCE_FORMAT = "kdbench-provenance-v1"


def run_trial(
    cfg: TrialConfig,
    out_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train and evaluate ``cfg`` in ``out_dir``; returns (and writes) the result dict.

    ``cfg.dataset_fingerprint`` and, for a KD method, ``cfg.teacher_id`` are filled in when
    None (the data's fingerprint, the teacher checkpoint's content digest); a fingerprint
    that differs from the data's is refused.  The result's ``key`` is the settled config's.
    """
    if cfg.packed:
        raise ValueError("a packed trial trains with kdbench.engine.packed.run_packed_trials, not run_trial")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    method = get_method(cfg.method)
    loss_cfg = method.effective_loss(cfg.loss)
    recipe = cfg.recipe
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    data = prepare_data(cfg.data, data_root, download=download)
    cfg = with_fingerprint(cfg, data)
    data.write_manifest(out / "manifest.csv")
    train_idx, val_idx, test_idx = (data.indices(s) for s in ("train", "val", "test"))
    images = data.images.to(device)
    labels = data.labels.to(device)
    train_images, train_labels = images[train_idx.to(device)], labels[train_idx.to(device)]
    aug = AUGMENTATIONS[cfg.data.augment]

    model = build_model(recipe.model, len(data.classes), recipe.pretrained).to(device, memory_format=memory_format(device))
    teacher, teacher_info = teacher_source(cfg, method.needs_teacher, data, train_images, device, log)
    if teacher_info is not None and cfg.teacher_id is None:
        cfg = dataclasses.replace(cfg, teacher_id=teacher_info["id"])

    optimizer = make_optimizer(model.parameters(), recipe)
    scheduler = make_scheduler(optimizer, recipe, len(train_idx))

    identity = resume_identity(cfg, teacher_info)
    extra = {"trial": identity, "provenance": provenance(cfg, data, teacher_info)}
    state = _resume(out / "last.pt", identity, model, optimizer, scheduler, log)
    history, best = state["history"], state["best"]
    sets = {s: (images[i.to(device)], labels[i.to(device)]) for s, i in (("val", val_idx), ("test", test_idx))}
    for epoch in range(state["epoch"], recipe.epochs):
        stats = train_one_epoch(
            model,
            method,
            loss_cfg,
            optimizer,
            scheduler,
            train_images,
            train_labels,
            aug,
            teacher,
            batch_size=recipe.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            device=device,
            desc=f"{cfg.method} {display_name(cfg.data.dataset)} epoch {epoch + 1}/{recipe.epochs}",
            progress=progress,
        )
        check_finite_state(model, f"of the model after training epoch {epoch + 1}")  # before it is validated or saved
        check_loss_growth(history[0]["train_loss"] if history else stats.loss, stats.loss, epoch + 1)
        what = f"validation logits at epoch {epoch + 1}"
        val = evaluate(model, *sets["val"], data.classes, batch_size=recipe.eval_batch_size, device=device, what=what)
        history.append(history_row(epoch + 1, stats, val, optimizer.param_groups[0]["lr"]))
        log(
            f"epoch {epoch + 1}/{recipe.epochs}: loss {stats.loss:.4f} train acc {stats.accuracy:.4f} "
            f"val acc {val['accuracy']:.4f} ({stats.images_per_s:.0f} img/s)"
        )
        improved = best is None or val["accuracy"] > best["val_accuracy"]
        if improved:
            best = {"epoch": epoch + 1, "val_accuracy": val["accuracy"]}
        # last.pt first: when it records this epoch as the best, its weights ARE the best weights, so a kill
        # before best.pt is written is repaired on resume (_resume); a best.pt ahead of last.pt cannot happen
        _save_resume_state(
            out / "last.pt", model, optimizer, scheduler, recipe.model, data.classes, extra, epoch + 1, history, best
        )
        if improved:
            save_best(out / "best.pt", model, recipe.model, data.classes, extra, epoch + 1)

    result = build_result(cfg, data, teacher_info, model, out / "best.pt", best["epoch"], history, sets, t0, device)
    if method.role == "teacher" and result["chance"]["at_chance"] and not cfg.allow_chance_teacher:
        c = result["chance"]
        raise UserError(
            f"teacher at chance level: best validation accuracy {c['accuracy']:.3f} on {c['n']} images is not "
            f"significantly above chance {c['chance']:.3f} (binomial p = {c['p_value']:.2g}): its students would learn "
            "nothing from it; lower the learning rate, add warm-up or epochs, or check the data "
            "(--allow-chance-teacher, run.allow_chance_teacher = true, keeps it for pipeline tests)"
        )
    atomic_write_json(out / METRICS_FILE, result)
    log(
        f"test accuracy: best-on-val (epoch {result['best']['epoch']}) {result['best']['test']['accuracy']:.4f}, "
        f"last epoch ({recipe.epochs}) {result['last']['test']['accuracy']:.4f}"
    )
    return result


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
) -> dict:
    """A trial's result: val and test metrics of the best-on-validation checkpoint and of the last weights, and its record.

    The test metrics carry the per-image ``predictions`` (class indices, in the order of ``test_targets``), so
    the report can pair two trials image by image; the best checkpoint's test logits are saved beside it
    (:data:`TEST_LOGITS_FILE`).  NaN/inf logits (or weights in ``best_checkpoint``) raise a NonFiniteError.
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
    return {
        "format": "kdbench-result-v1",
        "key": cfg.key(),
        "loss_version": LOSS_VERSION,
        "results_version": RESULTS_VERSION,
        "config": cfg.identity(),
        "effective_loss": dataclasses.asdict(get_method(cfg.method).effective_loss(cfg.loss)),
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
    }


def teacher_source(cfg: TrialConfig, needed: bool, data: PreparedData, train_images: torch.Tensor, device: torch.device, log):
    """The teacher's logits source for a KD trial (cache where the augmentation allows), and a record of it."""
    if not needed:
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
    record = check_teacher_provenance(cfg, path, ckpt.get("provenance"), data)
    model = model.to(device, memory_format=memory_format(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    aug = AUGMENTATIONS[cfg.data.augment]
    digest = f"sha256:{file_sha256(path)}"
    info = {"checkpoint": str(path), "model": ckpt["model"], "id": cfg.teacher_id or digest, "digest": digest, **record}
    if not aug.cacheable:
        log(f"augmentation {aug.name} is not a finite view group: running the teacher online")
        return OnlineTeacher(model, str(path)), {
            **info,
            "mode": "online",
            "why": f"augmentation {aug.name} is continuous",
        }
    cache = cache_path(path, digest, data.digests_of("train"), cfg.data.resolution, aug, device)
    t0 = time.perf_counter()
    teacher: CachedTeacher = cached_teacher(
        model, cache, train_images, aug, batch_size=cfg.recipe.eval_batch_size, device=device, source=str(path)
    )
    return teacher, {**info, "mode": "cache", "cache": str(cache), "cache_load_s": time.perf_counter() - t0}


def check_teacher_provenance(cfg: TrialConfig, path: Path, prov: dict | None, data: PreparedData) -> dict:
    """Refuse a teacher trained on this run's validation or test images, or one without provenance
    (unless ``cfg.trust_teacher``); returns the result's record of the teacher's provenance."""
    if prov is None:
        if not cfg.trust_teacher:
            raise UserError(
                f"teacher {path} has no provenance record (an older or foreign checkpoint), so kdbench cannot check that "
                "it never saw this run's validation and test images: retrain it with this kdbench "
                "(python -m kdbench.train --method teacher with this run's data settings), or pass --trust-teacher "
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
    keep = ("trial_key", "dataset", "dataset_fingerprint", "manifest", "recipe")
    return {"provenance": {k: prov[k] for k in keep}, "trusted_without_provenance": False}


def save_best(path: Path, model, model_name: str, classes: list[str], extra: dict, epoch: int) -> None:
    """``best.pt``: the weights of ``epoch`` with their record (``extra``: the trial identity, the provenance)."""
    save_checkpoint(path, model, model_name=model_name, classes=classes, extra={**extra, "epoch": epoch})


def best_is_current(path: Path, identity: str, epoch: int) -> bool:
    """Whether ``best.pt`` at ``path`` holds this trial's weights of ``epoch``."""
    if not path.exists():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or corrupt: rewrite it
        return False
    return isinstance(ckpt, dict) and ckpt.get("trial") == identity and ckpt.get("epoch") == epoch


def _resume(path: Path, identity: str, model, optimizer, scheduler, log) -> dict:
    """Restore ``last.pt``; an unreadable one restarts the trial (with a warning), a foreign one is refused.

    ``best.pt`` is made consistent with it: when last.pt's epoch is the best one and best.pt
    is not of that epoch (killed between the two writes), best.pt is rewritten from last.pt.
    """
    fresh = {"epoch": 0, "history": [], "best": None}
    if not path.exists():
        return fresh
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        readable = isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and "optimizer" in state
    except Exception as err:  # truncated, corrupt, not a torch file
        readable, state = False, f"{type(err).__name__}: {one_line(err)}"
    if not readable:
        why = state if isinstance(state, str) else "not a kdbench resume checkpoint"
        log(f"warning: cannot read the resume state {path} ({why[:200]}): starting this trial from scratch")
        return fresh
    if state.get("trial") != identity:
        if _same_trial_other_teacher(state.get("trial"), identity):
            log(f"warning: {path} was trained from another teacher checkpoint (same trial): starting this trial from scratch")
            return fresh
        raise UserError(f"{path.parent} holds a different run (other settings): use another --out, or delete that folder")
    check_finite_state(
        state["state_dict"],
        f"of the resume state {path} (epoch {state['epoch']})",
        f"it cannot be resumed (an older kdbench saved it unchecked): delete {path.parent} to train this trial anew",
    )
    best = state["best"]
    best_path = path.with_name("best.pt")
    repair = best is not None and not best_is_current(best_path, identity, best["epoch"])
    if repair and best["epoch"] != state["epoch"]:
        log(f"warning: {best_path} does not match {path}: starting this trial from scratch")
        return fresh
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if repair:
        log(f"repairing {best_path} from {path} (epoch {best['epoch']})")
        record = {"trial": identity, "provenance": state.get("provenance")}
        save_best(best_path, model, state["model"], state["classes"], record, best["epoch"])
    log(f"resuming from {path} after epoch {state['epoch']}")
    return {"epoch": state["epoch"], "history": state["history"], "best": best}


def _same_trial_other_teacher(saved: str | None, identity: str) -> bool:
    """Whether a resume state's identity is this trial's with another teacher checkpoint (re-trained or replaced since)."""
    try:
        return json.loads(saved)["trial"] == json.loads(identity)["trial"]
    except (TypeError, ValueError, KeyError):
        return False


def _save_resume_state(path, model, optimizer, scheduler, model_name, classes, extra, epoch, history, best) -> None:
    """``last.pt``: best.pt's record (``extra``: the trial identity, the provenance) plus the optimiser, schedule and history."""
    save_checkpoint(
        path,
        model,
        model_name=model_name,
        classes=classes,
        extra={
            **extra,
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "best": best,
        },
    )

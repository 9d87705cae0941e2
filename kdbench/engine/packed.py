"""Train K compatible student trials as one packed network (the GPU fast path).

A small student is launch-bound on a GPU.  K sweep trials that differ only in
their method and loss settings (same data, recipe, seed and teacher) see exactly
the same batches, so they train together as one
:class:`~kdbench.packing.PackedMobileNetV2` (forward ``[B, 3, H, W] -> [K, B, C]``):

* init: member ``i`` is built as its separate trial would be
  (``torch.manual_seed(seed)``, then ``build_model``), then the K models are packed;
* batches: the shuffling, views and crops of
  :func:`~kdbench.engine.loop.train_one_epoch` for the shared seed
  (``epoch_seed(seed, epoch)``), and ONE teacher lookup per batch (the logit cache
  where the augmentation is finite, the teacher online otherwise);
* loss: ``L = sum_i L_i`` with ``L_i = method_i.loss(out[i], teacher_logits, y, loss_i)``.
  Member ``i``'s parameters ``theta_i`` are disjoint slices of the packed tensors
  and ``out[i]`` depends on ``theta_i`` only, so ``dL/dtheta_i = dL_i/dtheta_i``
  (a mean would scale every member's gradient by ``1/K``);
* optimiser: run_trial's (:func:`~kdbench.engine.loop.make_optimizer`: SGD with
  momentum or AdamW) over the packed parameters; its update is elementwise, so it
  acts as K separate optimisers sharing run_trial's LR schedule.

Results equal K separate :func:`~kdbench.engine.trial.run_trial` runs up to float
rounding, except the dropout masks: drawn per member and sample from the same
distribution, but not the same masks (see :mod:`kdbench.packing`).

Files: each member's folder gets what run_trial writes there (``manifest.csv``,
``best.pt`` as a plain torchvision ``mobilenet_v2`` checkpoint, ``metrics.json``
with run_trial's schema plus ``"pack": {"k", "members"}``), except ``last.pt``.
The pack's resume state is ONE file, ``pack.pt`` in the FIRST member's folder
(packed weights, optimiser, schedule, every member's history and best epoch),
written atomically after each epoch, so a killed pack resumes after its last
finished epoch.  A ``pack.pt`` of another member list (the sweep grouped the
trials differently) is ignored and overwritten: that pack starts from epoch 0.
``pack.pt`` is written before the members' ``best.pt``; a kill between the two is
repaired on resume (the state's weights are the best ones of a member whose best
epoch is the state's epoch).

A member whose loss becomes NaN/inf is dropped: it fails alone with its reason, and
the others restart from epoch 0 as a pack without it, so their results are exactly
those of that smaller pack (the epochs trained before the failure are spent again;
continuing the larger pack with the dead member's gradients zeroed would not be
exact: its dropout masks and grouped-convolution batching differ).  So is a member whose
weights or buffers hold NaN/inf after an epoch (or in ``pack.pt`` on resume), or whose
validation or test logits do (:mod:`kdbench.finite`): such weights are never saved,
selected as its best, or scored.  ``pack.pt`` records the dropped members, so a killed run
resumes without them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from kdbench.config import TrialConfig
from kdbench.data.prepare import PreparedData, prepare_data
from kdbench.data.presets import AUGMENTATIONS
from kdbench.data.specs import display_name
from kdbench.durable import atomic_torch_save, atomic_write_json, remove_stale_temps
from kdbench.engine.loop import (
    EpochStats,
    MemberLoss,
    MembersNonFinite,
    check_loss_growth,
    evaluate,
    make_optimizer,
    train_members_epoch,
)
from kdbench.engine.pack_rules import PACK_MODEL, check_pack
from kdbench.engine.runtime import memory_format, resolve_device
from kdbench.engine.trial import (
    METRICS_FILE,
    best_is_current,
    build_result,
    history_row,
    make_scheduler,
    provenance,
    resume_identity,
    save_best,
    teacher_source,
    with_fingerprint,
)
from kdbench.errors import NonFiniteError, one_line
from kdbench.finite import check_finite_state
from kdbench.methods import get_method
from kdbench.models import build_model
from kdbench.packing import PackedMobileNetV2

PACK_STATE_FILE = "pack.pt"
PACK_STATE_FORMAT = "kdbench-pack-state-v1"


def init_pack(cfgs: Sequence[TrialConfig], num_classes: int) -> PackedMobileNetV2:
    """Member ``i`` initialised as its separate trial: ``torch.manual_seed(seed_i)``, then ``build_model``."""
    members = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        members.append(build_model(cfg.recipe.model, num_classes, cfg.recipe.pretrained))
    return PackedMobileNetV2.from_members(members)


def train_pack_epoch(packed: nn.Module, members: Sequence[MemberLoss], *args, **kwargs) -> list[EpochStats]:
    """One epoch of :func:`~kdbench.engine.loop.train_one_epoch` for K members at once; one EpochStats per member.

    The batches (order, views, crops) are train_one_epoch's for ``seed`` and ``epoch``; the
    step minimises ``sum_i L_i``.  Timings and images/s are the pack's: each image trains K members.
    """
    return train_members_epoch(packed, members, *args, stacked=True, **kwargs)


@dataclasses.dataclass
class _Member:
    """One trial of the pack: its config, folder, loss, a plain model for evaluation and checkpoints, its record."""

    cfg: TrialConfig
    out: Path
    loss: MemberLoss
    model: nn.Module
    classes: list[str]
    identity: str  # what its resume state must match (kdbench.engine.trial.resume_identity)
    provenance: dict  # written into its best.pt
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict | None = None


def run_packed_trials(
    cfgs: list[TrialConfig],
    out_dirs: list[Path],
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train ``cfgs`` as one pack, member ``i`` into ``out_dirs[i]``; returns (and writes) each member's result.

    ``cfgs`` must pass :func:`check_pack` (ValueError otherwise).  Each result is
    run_trial's for that trial plus ``"pack": {"k": K, "members": [keys]}``; see the
    module docstring for files and resume.  Each config is trained, and keyed, with
    ``packed=True`` (a pack of one included) and run_trial's data fingerprint and teacher id.
    """
    t0 = time.perf_counter()
    check_pack(cfgs, out_dirs)
    device = resolve_device(cfgs[0].device)
    data = prepare_data(cfgs[0].data, data_root, download=download)
    cfgs = [with_fingerprint(dataclasses.replace(cfg, packed=True), data) for cfg in cfgs]
    splits = _Splits(data, device)
    teacher_cfg = next((cfg for cfg in cfgs if get_method(cfg.method).needs_teacher), None)
    train_images, _ = splits["train"]
    teacher, teacher_info = teacher_source(teacher_cfg, True, data, train_images, device, log) if teacher_cfg else (None, None)
    if teacher_info is not None:
        cfgs = [
            dataclasses.replace(cfg, teacher_id=cfg.teacher_id or teacher_info["id"])
            if get_method(cfg.method).needs_teacher
            else cfg
            for cfg in cfgs
        ]
    members = [_member(cfg, Path(out), data, device, teacher_info) for cfg, out in zip(cfgs, out_dirs)]
    for m in members:
        m.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(m.out)
        data.write_manifest(m.out / "manifest.csv")
    state_path = members[0].out / PACK_STATE_FILE
    dropped = _dropped_before(state_path, members)  # members a killed run of this pack had already dropped
    scored: dict[str, dict] = {}
    while alive := [m for m in members if m.identity not in dropped]:
        packed = init_pack([m.cfg for m in alive], len(data.classes)).to(device, memory_format=memory_format(device))
        for m in alive:
            m.history, m.best = [], None
        try:
            _train(packed, alive, teacher, splits, cfgs[0], progress, log, state_path, dropped)
            results = _each_member(
                alive,
                [partial(_member_result, m, splits, teacher_info if m.loss.method.needs_teacher else None, t0) for m in alive],
            )
            scored = {m.identity: result for m, result in zip(alive, results)}
            break
        except MembersNonFinite as err:
            for i, reason in err.reasons.items():
                dropped[alive[i].identity] = reason
                log(f"dropping {alive[i].loss.label} from the pack: {reason}")
            if len(alive) > len(err.reasons):
                log(f"restarting the other {len(alive) - len(err.reasons)} member(s) from epoch 0 as a pack without it")
    pack = {"k": len(members), "members": [m.cfg.key() for m in members]}
    results: list[dict | MemberFailed] = []
    for m in members:
        if m.identity in dropped:
            results.append(MemberFailed(dropped[m.identity]))
            continue
        result = scored[m.identity] | {"pack": pack}
        if dropped:
            result["pack"] = pack | {"dropped": [x.cfg.key() for x in members if x.identity in dropped]}
        atomic_write_json(m.out / METRICS_FILE, result)
        best, last = result["best"], result["last"]
        log(
            f"{m.loss.label}: test accuracy best-on-val (epoch {best['epoch']}) {best['test']['accuracy']:.4f}, "
            f"last epoch ({last['epoch']}) {last['test']['accuracy']:.4f}"
        )
        results.append(result)
    return results


class MemberFailed(NonFiniteError):
    """The result of a pack member dropped because its loss, weights or logits became non-finite (the others went on)."""


def _each_member(members: Sequence[_Member], calls: Sequence[Callable[[], object]]) -> list:
    """``calls[i]()`` for each member ``i``, in order; members whose call raised a NonFiniteError fail, after all ran.

    Raises MembersNonFinite (each failed member's index and one-line reason): the pack drops them and restarts without them.
    """
    done, reasons = [], {}
    for i, call in enumerate(calls):
        try:
            done.append(call())
        except NonFiniteError as err:
            reasons[i] = one_line(err)
    if reasons:
        where = "; ".join(f"{i} {members[i].loss.label}: {reason}" for i, reason in reasons.items())
        raise MembersNonFinite(f"non-finite values in packed member(s) {where}", reasons)
    return done


class _Splits:
    """The dataset on the device (moved once): ``splits[name] -> (uint8 images, labels)``."""

    def __init__(self, data: PreparedData, device: torch.device):
        self.data, self.device = data, device
        images, labels = data.images.to(device), data.labels.to(device)
        self.sets = {s: (images[i], labels[i]) for s in ("train", "val", "test") for i in [data.indices(s).to(device)]}

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sets[split]


def _train(
    packed: PackedMobileNetV2,
    members: list[_Member],
    teacher,
    splits: _Splits,
    first: TrialConfig,
    progress: bool,
    log,
    state_path: Path,
    dropped: dict[str, str],
) -> None:
    """The epochs not yet done (resuming from the pack state); run_trial's optimiser, schedule and per-epoch records."""
    recipe, device, k = first.recipe, splits.device, len(members)
    train_images, train_labels = splits["train"]
    optimizer = make_optimizer(packed.parameters(), recipe)
    scheduler = make_scheduler(optimizer, recipe, len(train_images))
    for epoch in range(_resume(state_path, members, packed, optimizer, scheduler, log), recipe.epochs):
        stats = train_pack_epoch(
            packed,
            [m.loss for m in members],
            optimizer,
            scheduler,
            train_images,
            train_labels,
            AUGMENTATIONS[first.data.augment],
            teacher,
            batch_size=recipe.batch_size,
            seed=first.seed,
            epoch=epoch,
            device=device,
            desc=f"pack of {k} {display_name(first.data.dataset)} epoch {epoch + 1}/{recipe.epochs}",
            progress=progress,
        )
        _load_members(packed, members)
        where = f"of the model after training epoch {epoch + 1}"  # checked before it is validated or saved
        _each_member(members, [partial(check_finite_state, m.model, where) for m in members])
        growth = [
            partial(check_loss_growth, m.history[0]["train_loss"] if m.history else s.loss, s.loss, epoch + 1, m.loss.label)
            for m, s in zip(members, stats)
        ]
        _each_member(members, growth)  # an exploding member fails alone, like a non-finite one
        lr = optimizer.param_groups[0]["lr"]
        improved = _each_member(
            members, [partial(_record_epoch, m, epoch + 1, s, lr, splits, recipe.eval_batch_size) for m, s in zip(members, stats)]
        )
        # the pack state first, then best.pt: a kill between them is repaired on resume (see _resume)
        _save_state(state_path, members, packed, optimizer, scheduler, epoch + 1, dropped)
        for m, better in zip(members, improved):
            if better:
                _save_best(m)
        summary = "; ".join(
            f"[{i}] {m.loss.label} loss {m.history[-1]['train_loss']:.4f} val acc {m.history[-1]['val_accuracy']:.4f}"
            for i, m in enumerate(members)
        )
        log(f"epoch {epoch + 1}/{recipe.epochs}: {summary} ({stats[0].images_per_s:.0f} img/s x {k} students)")
    _load_members(packed, members)


def _record_epoch(m: _Member, epoch: int, stats: EpochStats, lr: float, splits: _Splits, eval_batch_size: int) -> bool:
    """Validate member ``m`` (its model holds this epoch's weights), append its history row; True if it improved."""
    what = f"validation logits at epoch {epoch}"
    val = evaluate(m.model, *splits["val"], splits.data.classes, batch_size=eval_batch_size, device=splits.device, what=what)
    m.history.append(history_row(epoch, stats, val, lr))
    if m.best is None or val["accuracy"] > m.best["val_accuracy"]:
        m.best = {"epoch": epoch, "val_accuracy": val["accuracy"]}
        return True
    return False


def _save_best(m: _Member) -> None:
    record = {"trial": m.identity, "provenance": m.provenance}
    save_best(m.out / "best.pt", m.model, PACK_MODEL, m.classes, record, m.best["epoch"])


def _member(cfg: TrialConfig, out: Path, data: PreparedData, device: torch.device, teacher_info: dict | None) -> _Member:
    method = get_method(cfg.method)
    loss_cfg = method.effective_loss(cfg.loss)
    label = f"{cfg.method} α {loss_cfg.alpha:g}, {method.describe(loss_cfg)} [{cfg.key()}]"
    model = build_model(PACK_MODEL, len(data.classes)).to(device, memory_format=memory_format(device))
    teacher_info = teacher_info if method.needs_teacher else None
    return _Member(
        cfg,
        out,
        MemberLoss(label, method, loss_cfg),
        model,
        classes=list(data.classes),
        identity=resume_identity(cfg, teacher_info),
        provenance=provenance(cfg, data, teacher_info),
    )


def _load_members(packed: PackedMobileNetV2, members: Sequence[_Member]) -> None:
    """Copy the packed weights into each member's plain torchvision model."""
    for m, state in zip(members, packed.unpack()):
        m.model.load_state_dict(state)


def _member_result(m: _Member, splits: _Splits, teacher_info: dict | None, t0: float) -> dict:
    """run_trial's result for member ``m`` (its model holds the last weights); ``total_s`` is the whole pack's wall time."""
    sets = {s: splits[s] for s in ("val", "test")}
    return build_result(
        m.cfg,
        splits.data,
        teacher_info,
        m.model,
        m.out / "best.pt",
        m.best["epoch"],
        m.history,
        sets,
        t0,
        splits.device,
    )


def _read_state(path: Path, log) -> dict | None:
    """The pack state at ``path``, or None (absent, or unreadable: then with a warning, and the pack starts over)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("format") == PACK_STATE_FORMAT:
            return state
        why = "not a kdbench pack resume state"
    except Exception as err:  # truncated, corrupt, not a torch file
        why = f"{type(err).__name__}: {one_line(err)}"[:200]
    log(f"warning: cannot read the pack resume state {path} ({why}): starting the pack from scratch")
    return None


def _dropped_before(path: Path, members: Sequence[_Member]) -> dict[str, str]:
    """Members that the run which wrote the pack state at ``path`` (for these members) had dropped, with their reasons."""
    state = _read_state(path, lambda message: None)
    if state is None:
        return {}
    dropped = state.get("dropped") or {}
    return dict(dropped) if sorted([*state["members"], *dropped]) == sorted(m.identity for m in members) else {}


def _resume(path: Path, members: Sequence[_Member], packed: nn.Module, optimizer, scheduler, log) -> int:
    """Restore the pack state at ``path`` if it belongs to these members; returns the first epoch to train.

    Each member's ``best.pt`` is made consistent with it: a member whose best epoch is the
    state's epoch and whose best.pt is not of that epoch (killed between the two writes)
    gets it rewritten from the packed weights.
    """
    state = _read_state(path, log)
    if state is None:
        return 0
    if state["members"] != [m.identity for m in members]:
        log(f"{path} holds another pack (other members): starting this pack from epoch 0")
        return 0
    repair = []
    for m, best in zip(members, state["best"]):
        if best is not None and not best_is_current(m.out / "best.pt", m.identity, best["epoch"]):
            if best["epoch"] != state["epoch"]:
                log(f"warning: {m.out / 'best.pt'} does not match {path}: starting this pack from epoch 0")
                return 0
            repair.append(m)
    packed.load_state_dict(state["state_dict"])
    _load_members(packed, members)
    where = f"of the pack resume state {path} (epoch {state['epoch']})"
    hint = f"it cannot be resumed (an older kdbench saved it unchecked): delete {path} to train this pack anew"
    _each_member(members, [partial(check_finite_state, m.model, where, hint) for m in members])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for m, history, best in zip(members, state["history"], state["best"]):
        m.history, m.best = history, best
    if repair:
        for m in repair:
            log(f"repairing {m.out / 'best.pt'} from {path} (epoch {m.best['epoch']})")
            _save_best(m)
    log(f"resuming pack from {path} after epoch {state['epoch']}")
    return state["epoch"]


def _save_state(path: Path, members: Sequence[_Member], packed: nn.Module, optimizer, scheduler, epoch: int, dropped) -> None:
    atomic_torch_save(
        {
            "format": PACK_STATE_FORMAT,
            "members": [m.identity for m in members],
            "dropped": dict(dropped),
            "epoch": epoch,
            "state_dict": {k: v.detach().cpu() for k, v in packed.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": [m.history for m in members],
            "best": [m.best for m in members],
        },
        path,
    )

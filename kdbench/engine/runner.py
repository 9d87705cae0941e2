"""The one trial runner: K >= 1 trials end to end, with one resume state (:func:`run_trials`).

Every trial trains here, alone or in a pack (:func:`run_trial` is one
trial through it).  The model is the only thing that depends on how many trials train together:

* one trial planned unpacked (``cfg.packed`` False; any torchvision model: a teacher, a
  student) trains its plain model, built by ``torch.manual_seed(cfg.seed)`` then
  ``build_model`` (with ``recipe.pretrained``);
* ``K >= 1`` trials planned packed (MobileNetV2 students that pass
  :func:`~kdbench.engine.pack_rules.check_pack`) train as one
  :class:`~kdbench.packing.PackedMobileNetV2`, member ``i`` initialised as its trial alone
  would be (:mod:`kdbench.engine.packed` says why the results are those trials' results).

A method that needs features (:data:`kdbench.methods.NEEDS`) gets the student's through one
:class:`~kdbench.engine.features.FeatureTap` of the run, and its learnable parts, built right after the
seeded student, train with it in the same optimiser.

All the rest is one code path: the data on the device, the batches of
:func:`~kdbench.engine.loop.train_members_epoch` (``epoch_seed(seed, epoch)``) with one
teacher lookup per batch, the optimiser and LR schedule over the model's parameters, and
after each epoch, per member: the finite-state check, the loss-growth check, validation,
the history row and the best epoch.  Each member's folder gets the files of
:mod:`kdbench.engine.trial` (``manifest.csv``, ``best.pt`` as a plain torchvision
checkpoint, ``metrics.json``, ``test_logits.pt``); a packed member's result adds
``"pack": {"k", "members"}`` (and ``"dropped"``), a trial trained alone has no ``"pack"``.

Resume: ONE state file per call, ``state.pt`` (format ``kdbench-run-state-v1``) in the
FIRST member's folder: the model's weights (plain or packed), each member's method's learnable
parts (:meth:`kdbench.methods.Method.make_parts`: FitNet's regressor; never in ``best.pt``), the optimiser and schedule,
each member's identity (:func:`~kdbench.engine.trial.resume_identity`), history and best
epoch, and the members dropped so far.  It is written atomically after each epoch, before
any member's ``best.pt``, so a killed run resumes after its last finished epoch; killed
between the two writes, the resumed run rewrites ``best.pt`` from the state (whose weights
are that best epoch's).  An unreadable state restarts from scratch with a warning in the
log.  A state of other members: a pack (the sweep grouped its trials differently) ignores
it and overwrites it, starting from epoch 0; a single trial refuses a folder holding
another run (UserError: use another ``--out``), except the same trial distilled from
another teacher checkpoint (re-trained or replaced since), which restarts with a warning.
The resume files of older kdbench versions (``last.pt``, ``pack.pt``) are not read: a
trial they interrupted restarts from epoch 0 (its results are the same).

Failures: a trial trained alone fails (UserError) when its loss becomes NaN/inf or
explodes (an epoch's mean over 100x the first epoch's), when a NaN/inf is in its
weights or buffers after an epoch, in its validation or test logits, or in a checkpoint
it loads (teacher, ``best.pt``, ``state.pt``) (NonFiniteError, naming the tensor and the
epoch; :mod:`kdbench.finite`), and a teacher fails when its validation accuracy is not
significantly above chance (:func:`kdbench.engine.metrics.chance_test`).  In a pack, a
member whose loss, weights or logits go non-finite or explode is dropped: it fails alone
(:class:`MemberFailed`, its one-line reason), and the others restart from epoch 0 as a
pack without it, so their results are exactly those of that smaller pack (continuing the
larger pack with the dead member's gradients zeroed would not be exact: its dropout masks
and grouped-convolution batching differ).  The state records the dropped members, so a
killed run resumes without them.  Non-finite weights are never saved, selected as a best,
or scored.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
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
from kdbench.engine.features import FeatureTap, feature_shapes
from kdbench.engine.loop import (
    EpochStats,
    MemberLoss,
    MembersNonFinite,
    check_loss_growth,
    evaluate,
    make_optimizer,
    train_members_epoch,
)
from kdbench.engine.pack_rules import check_pack
from kdbench.engine.packed import init_pack
from kdbench.engine.runtime import memory_format, resolve_device
from kdbench.engine.trial import (
    METRICS_FILE,
    build_result,
    history_row,
    make_scheduler,
    provenance,
    resume_identity,
    save_best,
    teacher_source,
    with_fingerprint,
)
from kdbench.errors import NonFiniteError, UserError, one_line
from kdbench.finite import TRAINING_HINT, check_finite_state
from kdbench.methods import INDEX
from kdbench.models import build_model
from kdbench.packing import PackedMobileNetV2
from kdbench.records import TrialResult

STATE_FILE = "state.pt"
STATE_FORMAT = "kdbench-run-state-v1"


class MemberFailed(NonFiniteError):
    """The result of a pack member dropped because its loss, weights or logits became non-finite (the others went on)."""


@dataclasses.dataclass
class _Member:
    """One trial of the run: its config, folder, loss, plain model (evaluation and checkpoints), record and progress."""

    cfg: TrialConfig
    out: Path
    loss: MemberLoss
    model: nn.Module | None  # packed: a plain copy loaded from the pack; alone: the trained model itself
    classes: list[str]
    identity: str  # what the resume state must hold for it (kdbench.engine.trial.resume_identity)
    provenance: dict  # written into its best.pt
    teacher_info: dict | None  # the teacher's record, for a member that distils
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict | None = None


class _Splits:
    """The dataset on the device (moved once): ``splits[name] -> (uint8 images, labels)``."""

    def __init__(self, data: PreparedData, device: torch.device):
        self.data, self.device = data, device
        images, labels = data.images.to(device), data.labels.to(device)
        self.sets = {s: (images[i], labels[i]) for s in ("train", "val", "test") for i in [data.indices(s).to(device)]}

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sets[split]


def run_trials(
    cfgs: Sequence[TrialConfig],
    out_dirs: Sequence[str | os.PathLike],
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[TrialResult | MemberFailed]:
    """Train and evaluate ``cfgs``, trial ``i`` in ``out_dirs[i]``; returns (and writes) each trial's result.

    ``cfgs`` is one trial planned unpacked, or trials planned packed (``cfg.packed``) that
    pass :func:`check_pack` (a pack of one included); ValueError otherwise.  A pack member
    dropped for non-finite values comes back as a :class:`MemberFailed`; a trial trained
    alone raises instead.  ``dataset_fingerprint`` and, for a method that distils,
    ``teacher_id`` are filled in when None (the data's fingerprint, the teacher
    checkpoint's content digest); a fingerprint that differs from the data's is refused.
    Each result's ``key`` is the settled config's.  See the module docstring for files,
    resume and failures.
    """
    t0 = time.perf_counter()
    packed = _check(cfgs, out_dirs)
    outs = [Path(d) for d in out_dirs]
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
    device = resolve_device(cfgs[0].device)
    data = prepare_data(cfgs[0].data, data_root, download=download)
    cfgs = [with_fingerprint(cfg, data) for cfg in cfgs]
    for out in outs:
        data.write_manifest(out / "manifest.csv")
    splits = _Splits(data, device)
    teacher_cfg = next((cfg for cfg in cfgs if cfg.method_impl.needs_teacher), None)
    teacher, teacher_info = (None, None)
    if teacher_cfg is not None:
        needs = frozenset().union(*(cfg.method_impl.needs_from_teacher for cfg in cfgs))
        teacher, teacher_info = teacher_source(teacher_cfg, needs, data, splits["train"][0], device, log)
        cfgs = [
            dataclasses.replace(cfg, teacher_id=cfg.teacher_id or teacher_info["id"]) if cfg.method_impl.needs_teacher else cfg
            for cfg in cfgs
        ]
    members = [_member(cfg, out, data, teacher_info, packed, device) for cfg, out in zip(cfgs, outs)]
    state_path = outs[0] / STATE_FILE
    dropped = _dropped_before(state_path, members) if packed else {}  # a killed run of this pack had dropped them
    scored: dict[str, TrialResult] = {}
    while alive := [m for m in members if m.identity not in dropped]:
        model = _init_model(alive, len(data.classes), device, packed)
        for m in alive:
            m.history, m.best = [], None
        try:
            needs = frozenset().union(*(m.loss.method.needs_from_teacher for m in alive))
            with FeatureTap(model, needs, alive[0].cfg.recipe.model) as tap:  # the student's features, traced once
                _build_parts(alive, tap, teacher, cfgs[0].data.resolution, splits["train"][1], device, log)
                _train(model, tap, alive, teacher, splits, packed, progress, log, state_path, dropped)
            results = _each_member(alive, [partial(_member_result, m, splits, t0) for m in alive], packed)
            scored = {m.identity: result for m, result in zip(alive, results)}
            break
        except MembersNonFinite as err:
            if not packed:  # a trial trained alone fails with its one-line reason
                raise
            for i, reason in err.reasons.items():
                dropped[alive[i].identity] = reason
                log(f"dropping {alive[i].loss.label} from the pack: {reason}")
            if len(alive) > len(err.reasons):
                log(f"restarting the other {len(alive) - len(err.reasons)} member(s) from epoch 0 as a pack without it")
    pack = {"k": len(members), "members": [m.cfg.key() for m in members]}
    if dropped:
        pack["dropped"] = [m.cfg.key() for m in members if m.identity in dropped]
    results: list[TrialResult | MemberFailed] = []
    for m in members:
        if m.identity in dropped:
            results.append(MemberFailed(dropped[m.identity]))
            continue
        result = dataclasses.replace(scored[m.identity], pack=pack) if packed else scored[m.identity]
        atomic_write_json(m.out / METRICS_FILE, dataclasses.asdict(result))
        best, last = result.best, result.last
        log(
            f"{m.loss.label + ': ' if packed else ''}test accuracy: best-on-val (epoch {best.epoch}) "
            f"{best.test.accuracy:.4f}, last epoch ({last.epoch}) {last.test.accuracy:.4f}"
        )
        results.append(result)
    return results


def run_trial(cfg: TrialConfig, out_dir: str | os.PathLike, **kwargs) -> TrialResult:
    """Train and evaluate the one trial ``cfg`` in ``out_dir`` with :func:`run_trials` (same keywords).

    Returns (and writes) its result; a pack of one (``cfg.packed``) whose member failed raises that MemberFailed.
    """
    (result,) = run_trials([cfg], [out_dir], **kwargs)
    if isinstance(result, Exception):
        raise result
    return result


def _check(cfgs: Sequence[TrialConfig], out_dirs: Sequence[str | os.PathLike]) -> bool:
    """Whether ``cfgs`` train as a pack; ValueError unless they are one unpacked trial or a valid pack."""
    if cfgs and not any(cfg.packed for cfg in cfgs):
        if len(cfgs) != 1 or len(out_dirs) != 1:
            raise ValueError(
                f"only trials planned packed (cfg.packed) train together: got {len(cfgs)} unpacked trials "
                f"and {len(out_dirs)} output folders; pass one unpacked trial and its folder"
            )
        return False
    if not all(cfg.packed for cfg in cfgs):
        raise ValueError("trials planned packed and unpacked cannot train together: pass the packed ones")
    check_pack(cfgs, out_dirs)
    return True


def _member(
    cfg: TrialConfig, out: Path, data: PreparedData, teacher_info: dict | None, packed: bool, device: torch.device
) -> _Member:
    method, loss_cfg = cfg.method_impl, cfg.loss  # as the config settled it
    label = f"{cfg.method} α {loss_cfg.alpha:g}, {method.describe(loss_cfg)} [{cfg.key()}]" if packed else method.name
    teacher_info = teacher_info if method.needs_teacher else None
    # a pack member's weights are copied out of the pack into a plain model of its own (its initial values do not matter)
    plain = build_model(cfg.recipe.model, len(data.classes)).to(device, memory_format=memory_format(device)) if packed else None
    return _Member(
        cfg,
        out,
        MemberLoss(label, method, loss_cfg),
        plain,
        classes=list(data.classes),
        identity=resume_identity(cfg, teacher_info),
        provenance=provenance(cfg, data, teacher_info),
        teacher_info=teacher_info,
    )


def _init_model(members: Sequence[_Member], num_classes: int, device: torch.device, packed: bool) -> nn.Module:
    """The model to train, each member initialised as its trial alone: ``torch.manual_seed(seed)``, then ``build_model``."""
    fmt = memory_format(device)
    if packed:
        return init_pack([m.cfg for m in members], num_classes).to(device, memory_format=fmt)
    (m,) = members
    torch.manual_seed(m.cfg.seed)
    m.model = build_model(m.cfg.recipe.model, num_classes, m.cfg.recipe.pretrained).to(device, memory_format=fmt)
    return m.model


def _build_parts(
    members: Sequence[_Member], tap: FeatureTap, teacher, resolution: int, train_labels: torch.Tensor, device: torch.device, log
) -> None:
    """Each member's learnable parts (:meth:`kdbench.methods.Method.make_parts`), built from the shapes of the
    student's and the teacher's features right after the seeded student, on the device; set as ``method.parts``.
    A method needing ``"index"`` also gets ``train_labels``, the training split's labels."""
    shapes = ({}, {})
    if tap.wanted:  # features: probing their shapes costs a forward pass of each model
        teacher_shapes = teacher.feature_shapes(resolution, device) if teacher is not None else {}
        shapes = (feature_shapes(tap, resolution, device), teacher_shapes)
    for m in members:
        method = m.loss.method
        labels = {"train_labels": train_labels.cpu()} if INDEX in method.needs_from_teacher else {}
        parts = method.make_parts(*shapes, m.cfg.loss, **labels)
        method.parts = parts.to(device, memory_format=memory_format(device)) if parts is not None else None
        if parts is not None:
            n = sum(p.numel() for p in parts.parameters())
            log(f"{method.name}: learnable parts of {n:,} parameters, trained with the student, not deployed")


def _load_members(model: nn.Module, members: Sequence[_Member]) -> None:
    """Copy a pack's weights into each member's plain torchvision model (a plain model is its member's already)."""
    if isinstance(model, PackedMobileNetV2):
        for m, state in zip(members, model.unpack()):
            m.model.load_state_dict(state)


def _each_member(members: Sequence[_Member], calls: Sequence[Callable[[], object]], packed: bool) -> list:
    """``calls[i]()`` for each member ``i``, in order.

    In a pack, members whose call raised a NonFiniteError fail, after all ran: MembersNonFinite
    (each failed member's index and one-line reason), so the pack drops them and restarts without
    them.  A trial trained alone fails with the error itself.
    """
    if not packed:
        return [call() for call in calls]
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


def _train(
    model: nn.Module,
    tap: FeatureTap,
    members: list[_Member],
    teacher,
    splits: _Splits,
    packed: bool,
    progress: bool,
    log,
    state_path: Path,
    dropped: dict[str, str],
) -> None:
    """The epochs not yet done (resuming from the state file) and their records; the members' models end with the last weights.

    ``model`` runs through ``tap``; the members' learnable parts (``method.parts``) train with it, in one optimiser.
    """
    first = members[0].cfg
    recipe, device, k = first.recipe, splits.device, len(members)
    train_images, train_labels = splits["train"]
    parts = [m.loss.method.parts for m in members if m.loss.method.parts is not None]
    optimizer = make_optimizer(itertools.chain(model.parameters(), *(p.parameters() for p in parts)), recipe)
    scheduler = make_scheduler(optimizer, recipe, len(train_images))
    what = f"pack of {k}" if packed else first.method
    for epoch in range(_resume(state_path, members, model, optimizer, scheduler, packed, log), recipe.epochs):
        stats = train_members_epoch(
            model,
            [m.loss for m in members],
            optimizer,
            scheduler,
            train_images,
            train_labels,
            AUGMENTATIONS[first.data.augment],
            teacher,
            stacked=packed,
            batch_size=recipe.batch_size,
            seed=first.seed,
            epoch=epoch,
            device=device,
            desc=f"{what} {display_name(first.data.dataset)} epoch {epoch + 1}/{recipe.epochs}",
            progress=progress,
            tap=tap,
        )
        _load_members(model, members)
        where = f"of the model after training epoch {epoch + 1}"  # checked before it is validated or saved
        _each_member(members, [partial(_check_finite_member, m, where) for m in members], packed)
        growth = [
            partial(
                check_loss_growth,
                m.history[0]["train_loss"] if m.history else s.loss,
                s.loss,
                epoch + 1,
                m.loss.label if packed else "",
            )
            for m, s in zip(members, stats)
        ]
        _each_member(members, growth, packed)  # an exploding member fails alone, like a non-finite one
        lr = optimizer.param_groups[0]["lr"]
        improved = _each_member(
            members,
            [partial(_record_epoch, m, epoch + 1, s, lr, splits, recipe.eval_batch_size) for m, s in zip(members, stats)],
            packed,
        )
        # the state first, then best.pt: a kill between them is repaired on resume (see _resume)
        _save_state(state_path, members, model, optimizer, scheduler, epoch + 1, dropped)
        for m, better in zip(members, improved):
            if better:
                _save_best(m)
        log(_epoch_line(members, stats, epoch + 1, recipe.epochs, packed))
    _load_members(model, members)


def _check_finite_member(m: _Member, where: str, hint: str = TRAINING_HINT) -> None:
    """check_finite_state of the member's model and of its method's learnable parts."""
    check_finite_state(m.model, where, hint)
    if m.loss.method.parts is not None:
        check_finite_state(m.loss.method.parts, f"{where} ({m.loss.method.name}'s learnable parts)", hint)


def _epoch_line(members: Sequence[_Member], stats: Sequence[EpochStats], epoch: int, epochs: int, packed: bool) -> str:
    if not packed:
        (h,), (s,) = [m.history[-1] for m in members], stats
        return (
            f"epoch {epoch}/{epochs}: loss {s.loss:.4f} train acc {s.accuracy:.4f} "
            f"val acc {h['val_accuracy']:.4f} ({s.images_per_s:.0f} img/s)"
        )
    summary = "; ".join(
        f"[{i}] {m.loss.label} loss {m.history[-1]['train_loss']:.4f} val acc {m.history[-1]['val_accuracy']:.4f}"
        for i, m in enumerate(members)
    )
    return f"epoch {epoch}/{epochs}: {summary} ({stats[0].images_per_s:.0f} img/s x {len(members)} students)"


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
    save_best(m.out / "best.pt", m.model, m.cfg.recipe.model, m.classes, record, m.best["epoch"])


def _member_result(m: _Member, splits: _Splits, t0: float) -> TrialResult:
    """Member ``m``'s result (its model holds the last weights; ``total_s`` is the whole run's wall time).

    A teacher whose best validation accuracy is at chance fails (UserError) unless its config allows it.
    """
    sets = {s: splits[s] for s in ("val", "test")}
    best_path = m.out / "best.pt"
    result = build_result(
        m.cfg,
        splits.data,
        m.teacher_info,
        m.model,
        best_path,
        m.best["epoch"],
        m.history,
        sets,
        t0,
        splits.device,
        m.loss.method.parts,
    )
    if m.cfg.role == "teacher" and result.chance.at_chance and not m.cfg.allow_chance_teacher:
        c = dataclasses.asdict(result.chance)
        raise UserError(
            f"teacher at chance level: best validation accuracy {c['accuracy']:.3f} on {c['n']} images is not "
            f"significantly above chance {c['chance']:.3f} (binomial p = {c['p_value']:.2g}): its students would learn "
            "nothing from it; lower the learning rate, add warm-up or epochs, or check the data "
            "(--allow-chance-teacher, run.allow_chance_teacher = true, keeps it for pipeline tests)"
        )
    return result


# --- the resume state ------------------------------------------------------------------------------


def _read_state(path: Path, packed: bool, log) -> dict | None:
    """The state at ``path``, or None (absent, or unreadable: then with a warning, and the run starts over)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT:
            return state
        why = "not a kdbench resume state"
    except Exception as err:  # truncated, corrupt, not a torch file
        why = f"{type(err).__name__}: {one_line(err)}"[:200]
    which, who = ("pack resume state", "the pack") if packed else ("resume state", "this trial")
    log(f"warning: cannot read the {which} {path} ({why}): starting {who} from scratch")
    return None


def _dropped_before(path: Path, members: Sequence[_Member]) -> dict[str, str]:
    """Members that the run which wrote the state at ``path`` (for these members) had dropped, with their reasons."""
    state = _read_state(path, True, lambda message: None)
    if state is None:
        return {}
    dropped = state.get("dropped") or {}
    return dict(dropped) if sorted([*state["members"], *dropped]) == sorted(m.identity for m in members) else {}


def _resume(path: Path, members: Sequence[_Member], model: nn.Module, optimizer, scheduler, packed: bool, log) -> int:
    """Restore the state at ``path`` if it belongs to these members; returns the first epoch to train.

    Each member's ``best.pt`` is made consistent with it: a member whose best epoch is the
    state's epoch and whose best.pt is not of that epoch (killed between the two writes)
    gets it rewritten from the state's weights.
    """
    state = _read_state(path, packed, log)
    if state is None:
        return 0
    identities = [m.identity for m in members]
    if state["members"] != identities:
        if packed:
            log(f"{path} holds another pack (other members): starting this pack from epoch 0")
            return 0
        if _same_trial_other_teacher(state["members"], identities[0]):
            log(f"warning: {path} was trained from another teacher checkpoint (same trial): starting this trial from scratch")
            return 0
        raise UserError(f"{path.parent} holds a different run (other settings): use another --out, or delete that folder")
    repair = []
    for m, best in zip(members, state["best"]):
        if best is not None and not _best_is_current(m.out / "best.pt", m.identity, best["epoch"]):
            if best["epoch"] != state["epoch"]:
                who = "this pack from epoch 0" if packed else "this trial from scratch"
                log(f"warning: {m.out / 'best.pt'} does not match {path}: starting {who}")
                return 0
            repair.append(m)
    model.load_state_dict(state["state_dict"])
    _load_members(model, members)
    where = f"of the {'pack ' if packed else ''}resume state {path} (epoch {state['epoch']})"
    who = "this pack" if packed else "this trial"
    hint = f"it cannot be resumed (an older kdbench saved it unchecked): delete {path} to train {who} anew"
    for m, parts in zip(members, state.get("parts") or [None] * len(members)):  # the same trials: the same parts
        if parts is not None:
            m.loss.method.parts.load_state_dict(parts)
    _each_member(members, [partial(_check_finite_member, m, where, hint) for m in members], packed)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for m, history, best in zip(members, state["history"], state["best"]):
        m.history, m.best = history, best
    for m in repair:
        log(f"repairing {m.out / 'best.pt'} from {path} (epoch {m.best['epoch']})")
        _save_best(m)
    log(f"resuming {'pack ' if packed else ''}from {path} after epoch {state['epoch']}")
    return state["epoch"]


def _same_trial_other_teacher(saved: list[str], identity: str) -> bool:
    """Whether a state's one member is this trial with another teacher checkpoint (re-trained or replaced since)."""
    try:
        (other,) = saved
        return json.loads(other)["trial"] == json.loads(identity)["trial"]
    except (TypeError, ValueError, KeyError):
        return False


def _best_is_current(path: Path, identity: str, epoch: int) -> bool:
    """Whether ``best.pt`` at ``path`` holds this trial's weights of ``epoch``."""
    if not path.exists():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or corrupt: rewrite it
        return False
    return isinstance(ckpt, dict) and ckpt.get("trial") == identity and ckpt.get("epoch") == epoch


def _save_state(path: Path, members: Sequence[_Member], model: nn.Module, optimizer, scheduler, epoch: int, dropped) -> None:
    atomic_torch_save(
        {
            "format": STATE_FORMAT,
            "members": [m.identity for m in members],
            "dropped": dict(dropped),
            "epoch": epoch,
            "state_dict": _cpu_state(model),
            "parts": [_cpu_state(m.loss.method.parts) for m in members],  # each member's learnable parts, or None
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": [m.history for m in members],
            "best": [m.best for m in members],
        },
        path,
    )


def _cpu_state(module: nn.Module | None) -> dict | None:
    return None if module is None else {k: v.detach().cpu() for k, v in module.state_dict().items()}

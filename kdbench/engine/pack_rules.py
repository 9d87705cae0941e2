"""Which student trials can train as one packed network (:mod:`kdbench.engine.packed`).

Rules on configs only, without torch: the sweep groups its trials into packs with them in the
driver process (kdbench.sweep.packs), and the runner (:mod:`kdbench.engine.runner`) checks a pack with them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kdbench.config import TrialConfig

PACK_MODEL = "mobilenet_v2"


def compatible_key(cfg: TrialConfig) -> tuple:
    """What trials of one pack must share: everything but the method and the loss.

    ``(data, recipe, seed, device, teacher)`` with ``teacher = (teacher_checkpoint,
    teacher_id)`` for a method that distils, ``None`` for one that does not (the
    baseline ignores any teacher, as when it trains alone).  Trials with equal keys form a
    valid pack; a baseline may also join a pack whose keys differ from its own
    only in the teacher (:func:`check_pack` accepts at most one teacher).
    """
    teacher = (cfg.teacher_checkpoint, cfg.teacher_id) if cfg.method_impl.needs_teacher else None
    return (cfg.data, cfg.recipe, cfg.seed, cfg.device, teacher)


def check_pack(cfgs: Sequence[TrialConfig], out_dirs: Sequence[str | os.PathLike]) -> None:
    """Raise ValueError unless ``cfgs`` can train as one pack into ``out_dirs``."""
    if not cfgs:
        raise ValueError("a pack needs at least one trial")
    if len(out_dirs) != len(cfgs):
        raise ValueError(f"a pack of {len(cfgs)} trials needs {len(cfgs)} output folders, got {len(out_dirs)}")
    if len({Path(d).resolve() for d in out_dirs}) != len(out_dirs):
        raise ValueError("each trial of a pack needs its own output folder")
    for cfg in cfgs:
        if cfg.role != "student":
            raise ValueError(f"only student trials can be packed, got a {cfg.role}")
        if cfg.recipe.model != PACK_MODEL:
            raise ValueError(f"only {PACK_MODEL} students can be packed, got model {cfg.recipe.model!r}")
    keys = [cfg.key() for cfg in cfgs]
    if len(set(keys)) != len(keys):
        raise ValueError("a trial appears twice in the pack: pass each trial once")
    first = compatible_key(cfgs[0])
    for cfg in cfgs[1:]:
        key = compatible_key(cfg)
        for name, a, b in zip(("data", "recipe", "seed", "device"), first[:4], key[:4]):
            if a != b:
                raise ValueError(f"packed trials must share {name}: {cfgs[0].method} has {a}, {cfg.method} has {b}")
    teachers = {key[4] for key in map(compatible_key, cfgs)} - {None}
    if len(teachers) > 1:
        raise ValueError(f"packed trials must share one teacher (checkpoint, id), got {sorted(teachers, key=str)}")


def packable(cfg: TrialConfig) -> bool:
    """A student trial the packed network can train: a MobileNetV2 student whose method needs no features
    (one teacher lookup of logits serves the pack; the packed network gives no per-member embedding)."""
    return cfg.role == "student" and cfg.recipe.model == PACK_MODEL and cfg.method_impl.needs_from_teacher <= {"logits"}

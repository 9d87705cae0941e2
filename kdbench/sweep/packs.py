"""Group compatible student trials into packs trained as one network (the GPU fast path).

Trials of one pack share everything but their method and loss settings
(:func:`kdbench.engine.packed.compatible_key`) and distil from the same teacher, so
they see the same batches and one teacher lookup serves them all.
"""

from __future__ import annotations

import hashlib

from kdbench.engine.packed import PACK_MODEL, compatible_key
from kdbench.sweep.plan import PlannedTrial


def default_pack_size(requested: int, device_type: str) -> int:
    """``requested`` if given (> 0), else 8 students per pack on CUDA and 1 (no packing) elsewhere."""
    if requested > 0:
        return requested
    return 8 if device_type == "cuda" else 1


def pack_trials(trials: list[PlannedTrial], k: int) -> list[PlannedTrial]:
    """``trials`` with compatible MobileNetV2 students grouped in packs of at most ``k`` (teachers first, order kept)."""
    if k <= 1:
        return trials
    units: list[PlannedTrial] = []
    groups: dict[tuple, list[PlannedTrial]] = {}
    for t in trials:
        if t.role == "student" and t.config.recipe.model == PACK_MODEL:
            groups.setdefault(compatible_key(t.config) + (t.teacher_key,), []).append(t)
        else:
            units.append(t)
    for members in groups.values():
        for lo in range(0, len(members), k):
            chunk = members[lo : lo + k]
            units.append(chunk[0] if len(chunk) == 1 else make_pack(chunk))
    return units


def make_pack(members: list[PlannedTrial]) -> PlannedTrial:
    digest = hashlib.sha256(",".join(m.key for m in members).encode()).hexdigest()[:12]
    return PlannedTrial(f"pack-{digest}", members[0].config, members[0].teacher_key, tuple(members))

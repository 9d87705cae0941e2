"""Group compatible student trials into packs trained as one network (the GPU fast path).

Trials of one pack share everything but their method and loss settings
(:func:`kdbench.engine.pack_rules.compatible_key`) and distil from the same teacher, so
they see the same batches and one teacher lookup serves them all.
"""

from __future__ import annotations

from kdbench.digest import text_digest
from kdbench.engine.pack_rules import compatible_key
from kdbench.sweep.plan import PlannedTrial


def default_pack_size(requested: int, device_type: str) -> int:
    """``requested`` if given (> 0), else 8 students per pack on CUDA and 1 (no packing) elsewhere."""
    if requested > 0:
        return requested
    return 8 if device_type == "cuda" else 1


def pack_trials(trials: list[PlannedTrial], k: int) -> list[PlannedTrial]:
    """``trials`` with the students planned ``packed`` grouped in packs of at most ``k`` (teachers first, order kept).

    Exactly the trials whose config says ``packed`` train in a pack (their key says so): a
    lone one trains as a pack of one, and every other trial singly.
    """
    units: list[PlannedTrial] = []
    groups: dict[tuple, list[PlannedTrial]] = {}
    for t in trials:
        if t.config.packed:
            groups.setdefault(compatible_key(t.config) + (t.teacher_key,), []).append(t)
        else:
            units.append(t)
    for members in groups.values():
        for lo in range(0, len(members), max(k, 1)):
            units.append(make_pack(members[lo : lo + max(k, 1)]))
    return units


def make_pack(members: list[PlannedTrial]) -> PlannedTrial:
    digest = text_digest(",".join(m.key for m in members), 12)
    return PlannedTrial(f"pack-{digest}", members[0].config, members[0].teacher_key, tuple(members))

"""The student baseline, trained alone on hard labels."""

from kdbench.methods import HardLabels, register


@register
class Baseline(HardLabels):
    """The student trained alone on hard labels: ``CE(s, y)``."""

    name = "baseline"
    label = "Student baseline (CE)"
    rank = 10

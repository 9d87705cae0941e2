"""The teacher network, trained on hard labels."""

from kdbench.methods import HardLabels, register


@register
class Teacher(HardLabels):
    """The teacher network trained on hard labels: ``CE(t, y)``."""

    name = "teacher"
    label = "Teacher"
    rank = 0
    role = "teacher"

"""The student baseline, trained alone on hard labels; a teacher trains the same way (``TrialConfig.role``)."""

from kdbench import losses
from kdbench.methods import Method, register


@register
class Baseline(Method):
    """Plain supervised training: ``CE(s, y)`` with weight 1; no hyperparameters."""

    name = "baseline"
    label = "Student baseline (CE)"
    rank = 10

    def loss(self, student, teacher, targets, cfg):
        losses.check_logits(student.logits, None, targets)
        ce = losses.cross_entropy_term(student.logits, targets)
        return ce, {"ce": ce}

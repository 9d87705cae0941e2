"""The combined loss of arXiv 2606.14886, "Improved Knowledge Distillation for Land-Use Image Classification"."""

from kdbench.methods import Method, register


@register
class KDKLCos(Method):
    """The paper's combined loss: ``alpha * CE + beta * T^2 * KL + gamma * (1 - cos)`` (:mod:`kdbench.losses`)."""

    name = "kd_kl_cos"
    label = "KD (KL+Cos)"
    rank = 40
    uses_kl = True
    uses_cos = True

"""Cosine-similarity distillation: the paper's cosine term alone."""

from kdbench.methods import Method, register


@register
class KDCos(Method):
    """Cosine-similarity KD: ``alpha * CE + gamma * (1 - cos)`` (:func:`kdbench.losses.cosine_term`)."""

    name = "kd_cos"
    label = "KD (Cos)"
    rank = 30
    uses_cos = True

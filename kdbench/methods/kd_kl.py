"""Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": the paper's KL term alone."""

from kdbench.methods import Method, register


@register
class KDKL(Method):
    """Hinton KD: ``alpha * CE + beta * T^2 * KL`` (:func:`kdbench.losses.kl_term`)."""

    name = "kd_kl"
    label = "KD (KL)"
    rank = 20
    uses_kl = True

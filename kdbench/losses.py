"""Distillation losses as pure functions (no state, no modules).

Notation: ``s`` student logits and ``t`` teacher logits, both ``[B, C]``; ``y`` integer
class targets ``[B]``; ``T > 0`` the temperature; ``softmax(z / T)`` a
temperature-softened distribution.  Every term is a batch mean, so the loss of a
batch does not depend on its size.

The combined objective of arXiv 2606.14886 ("Improved Knowledge Distillation for
Land-Use Image Classification") is

    L = alpha * CE(s, y) + beta * T^2 * KL(softmax(t/T) || softmax(s/T)) + gamma * (1 - cos(s, t))

The paper's abstract does not spell out the KL convention, so kdbench follows
Hinton et al. (2015): the KL term is multiplied by ``T^2`` so that its gradient keeps
roughly the same magnitude as ``T`` changes, and it is reduced with ``batchmean``
(sum over classes, mean over the batch), which is the true KL divergence per
sample (``reduction="mean"`` would also divide by ``C``: a classic KD bug).

Bump :data:`LOSS_VERSION` whenever a formula here changes: it is part of every
sweep trial's key, so stored results from an older formula are never reused.  A method
module with its own loss (kdbench.methods: dkd, dist, lskd) has its own ``loss_version``
instead, keying only its trials.

torch is imported inside the functions that compute: planning a sweep (trial keys, weight
checks) reads this module without loading torch (kdbench.machine says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

LOSS_VERSION = "1"
COSINE_ON = ("logits", "probs")


@dataclass(frozen=True)
class LossConfig:
    """What a student's loss shares with every other, and what is its method's own.

    ``alpha``: the cross-entropy weight of every student (``[loss] alpha``).  ``params``: the method's
    hyperparameters as ``(name, value)`` pairs, value a float or a word (kdbench.methods.Params); a
    :class:`~kdbench.config.TrialConfig` holds them settled (every one given, in the method's order).
    The paper's objective below is ``kd_kl_cos`` with ``params`` temperature, beta, gamma and on.
    """

    alpha: float = 1.0
    params: tuple[tuple[str, float | str], ...] = ()


class LossTerms(NamedTuple):
    """The unweighted terms of :func:`distillation_loss` (``None`` where the weight is 0)."""

    ce: torch.Tensor | None
    kl: torch.Tensor | None
    cos: torch.Tensor | None


def cross_entropy_term(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy, ``CE(s, y) = mean_b [ -log softmax(s_b)[y_b] ]``."""
    import torch.nn.functional as F

    return F.cross_entropy(student_logits, targets)


def kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term, ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    ``KL(p || q) = mean_b sum_c p_bc * (log p_bc - log q_bc)`` with ``p = softmax(t/T)``
    (teacher) and ``q = softmax(s/T)`` (student): batchmean reduction, times ``T^2``.
    """
    import torch.nn.functional as F

    _check_temperature(temperature)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * (temperature**2)


def cosine_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    on: str = "logits",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cosine-similarity term, ``mean_b [ 1 - cos(u_b, v_b) ]`` with ``cos(u, v) = u.v / (|u| |v|)``.

    ``on="logits"``: ``u = s`` and ``v = t`` (the default; scale-free, so ``T`` does not
    enter).  ``on="probs"``: ``u = softmax(s/T)`` and ``v = softmax(t/T)``.
    Ranges over ``[0, 2]``; 0 when the two vectors point the same way.
    """
    import torch.nn.functional as F

    if on == "logits":
        u, v = student_logits, teacher_logits
    elif on == "probs":
        _check_temperature(temperature)
        u = F.softmax(student_logits / temperature, dim=1)
        v = F.softmax(teacher_logits / temperature, dim=1)
    else:
        raise ValueError(f"cosine_on must be one of {COSINE_ON}, got {on!r}")
    return (1.0 - F.cosine_similarity(u, v, dim=1, eps=1e-8)).mean()


def loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
    cosine_on: str = "logits",
) -> LossTerms:
    """Validate the inputs and compute each term whose weight is non-zero."""
    check_weights(alpha, beta, gamma, temperature, cosine_on)
    needs_teacher = beta > 0 or gamma > 0
    if needs_teacher and teacher_logits is None:
        raise ValueError("beta or gamma > 0 needs teacher logits")
    check_logits(student_logits, teacher_logits if needs_teacher else None, targets)
    ce = cross_entropy_term(student_logits, targets) if alpha > 0 else None
    kl = kl_term(student_logits, teacher_logits, temperature) if beta > 0 else None
    cos = cosine_term(student_logits, teacher_logits, on=cosine_on, temperature=temperature) if gamma > 0 else None
    return LossTerms(ce, kl, cos)


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor) -> None:
    """``ValueError`` unless student logits are ``[B, C]``, targets ``[B]`` and teacher logits (if given) the student's shape."""
    if student_logits.ndim != 2:
        raise ValueError(f"student logits must be [batch, classes], got shape {tuple(student_logits.shape)}")
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match the batch of student logits {tuple(student_logits.shape)}"
        )
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits shape {tuple(teacher_logits.shape)} does not match student logits "
            f"shape {tuple(student_logits.shape)}"
        )


def combine(terms: LossTerms, *, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """``alpha * ce + beta * kl + gamma * cos`` over the terms that were computed."""
    total = None
    for weight, term in ((alpha, terms.ce), (beta, terms.kl), (gamma, terms.cos)):
        if term is not None:
            total = weight * term if total is None else total + weight * term
    assert total is not None  # check_weights guarantees one non-zero weight
    return total


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
    cosine_on: str = "logits",
) -> torch.Tensor:
    """The paper's objective as a scalar:

        alpha * CE(s, y) + beta * T^2 * KL(softmax(t/T) || softmax(s/T)) + gamma * (1 - cos(s, t))

    KL is batchmean; the cosine is on logits (``cosine_on="logits"``) or on the
    softened probabilities ``softmax(./T)`` (``cosine_on="probs"``), averaged over the
    batch.  ``teacher_logits`` may be ``None`` when ``beta == gamma == 0``.
    Raises ``ValueError`` for ``T <= 0``, a negative or non-finite weight, all-zero
    weights, or mismatched shapes.
    """
    terms = loss_terms(
        student_logits,
        teacher_logits,
        targets,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        temperature=temperature,
        cosine_on=cosine_on,
    )
    return combine(terms, alpha=alpha, beta=beta, gamma=gamma)


def check_weights(alpha: float, beta: float, gamma: float, temperature: float, cosine_on: str = "logits") -> None:
    """Raise ``ValueError`` unless weights are finite and >= 0, not all 0, and ``T > 0``."""
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        check_weight(name, value)
    if alpha == 0 and beta == 0 and gamma == 0:
        raise ValueError("loss weights alpha, beta and gamma are all 0: at least one must be > 0")
    _check_temperature(temperature)
    if cosine_on not in COSINE_ON:
        raise ValueError(f"cosine_on must be one of {COSINE_ON}, got {cosine_on!r}")


def check_weight(name: str, value: float) -> None:
    """Raise ``ValueError`` unless the loss weight ``name`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value!r}")


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature T must be a finite number > 0, got {temperature!r}")

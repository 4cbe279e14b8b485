"""Distillation losses (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from softlabels.errors import SoftlabelsError
from softlabels.options import TOPK_CONVENTIONS, check_alpha
from softlabels.tempering import (
    at_least_float32,
    check_temperature,
    tempered_log_softmax,
    tempered_softmax,
)
from softlabels.train.padded import SequenceBatch


def _check(temperature: float, alpha: float) -> None:
    """The options' own checks (one function each), for callers that pass raw numbers; any
    positive T tempers (T -> inf is logit matching)."""
    check_temperature(temperature, at_most=math.inf)
    check_alpha(alpha)


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows that have a hard target (label >= 0; -1 = none, e.g. a
    sequence's last position); 0 with a gradient path when no row has one."""
    known = labels >= 0
    if not known.any():
        return logits.sum() * 0
    return F.cross_entropy(logits[known].float(), labels[known])


def kd_loss_from_probs(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton KD against stored teacher probabilities p_T (B, C) at temperature T:

        L = alpha * T^2 * KL(p_T || softmax(s / T)) + (1 - alpha) * CE(labels, softmax(s))

    KL is summed over classes and averaged over the batch. The soft term's gradients scale as
    1/T^2, hence the explicit T^2. Rows whose label is -1 (unknown) take no hard term; with
    `labels=None` the loss is the soft term alone, T^2 * KL.
    """
    _check(temperature, alpha)
    log_q = tempered_log_softmax(student_logits, temperature)
    # KL(p || q) = sum p (log p - log q), with 0 log 0 = 0; "batchmean" sums classes, means rows.
    soft = temperature**2 * F.kl_div(log_q, at_least_float32(teacher_probs),
                                     reduction="batchmean")
    if labels is None:
        return soft
    # Unknown labels (-1) are ignored but still count in the batch mean.
    hard = F.cross_entropy(at_least_float32(student_logits), labels, ignore_index=-1,
                           reduction="sum") / len(labels)
    return alpha * soft + (1 - alpha) * hard


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton et al. (2015) distillation loss from teacher logits t and student logits s:

        L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

    KL summed over classes, averaged over the batch; with `labels=None`, T^2 * KL alone.
    The paper found a considerably lower weight on the hard term best (alpha near 0.9).
    """
    _check(temperature, alpha)
    teacher_probs = tempered_softmax(teacher_logits.detach(), temperature)
    return kd_loss_from_probs(student_logits, teacher_probs, temperature=temperature,
                              labels=labels, alpha=alpha)


def logit_matching_loss(student_logits: torch.Tensor,
                        teacher_logits: torch.Tensor) -> torch.Tensor:
    """The high-temperature limit of distillation (Hinton et al. 2015, §2.1; Caruana et al.):

        L = 0.5 * mean((z - v)^2)

    over zero-meaned student logits z and teacher logits v (means taken per row), averaged over
    batch and classes.
    """
    z = student_logits.float()
    v = teacher_logits.detach().float()
    z = z - z.mean(dim=-1, keepdim=True)
    v = v - v.mean(dim=-1, keepdim=True)
    return 0.5 * ((z - v) ** 2).mean()


# Every convention: the two top-k ones, and the unbiased estimate of sampled and hybrid targets.
CONVENTIONS = (*TOPK_CONVENTIONS, "estimate")


def sparse_kd_loss(
    student_logits: torch.Tensor,
    classes: torch.Tensor,
    weights: torch.Tensor,
    log_p: torch.Tensor | None = None,
    *,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 0.9,
    convention: str = "residual",
) -> torch.Tensor:
    """Hinton KD against sparse teacher targets: `classes` (B, k) with `weights` (B, k).

    With q = softmax(s / T) the student and w the weights, the soft term per row is
    (T^2 times, averaged over rows):

    * top-k, `convention="residual"` (the default): w are the k exact teacher probabilities
      and r = 1 - sum(w) the mass outside them, one more bucket matched against the student's
      mass outside the k classes, a KL over k + 1 buckets:
          sum_j w_j log(w_j / q_j) + r log(r / (1 - sum_j q_j)).
      (DistillKit's "symmetric_uniform": the rest spread alike over the other classes in
      teacher and student, which gives the same value for probabilities stored at T.)
    * top-k, `convention="zero"` (DistillKit's default, `missing_probability_handling: zero`):
      the k probabilities renormalised, p~_j = w_j / sum(w), the other classes taken as 0:
          sum_j p~_j log(p~_j / q_j),
      with q the student's full softmax (not renormalised over the k classes). Its gradient,
      T (q - p~), pushes the student's mass outside the k classes to 0.
    * `convention="estimate"` (sampled and hybrid targets): an unbiased estimate of
      KL(p_T || q), sum_j w_j (log p_j - log q_j), where w are importance weights whose
      expectation is p_T (1/k per draw for sampled classes; the head's exact probabilities and
      the tail draws' weights for a hybrid, format/targets/hybrid.py) and `log_p` the teacher's
      log-probabilities of the classes (for sampled classes, None: estimated by each class's
      frequency among its row's draws). The gradient, T (sum_j w_j q - w), has expectation
      T (q - p_T): the dense KL's.

    Columns of weight 0 (a hybrid head's padding) add nothing. Top-k targets are biased either
    way: they ignore how the residual mass is spread (Anshumann et al., "Sparse Logit
    Sampling", ACL 2025). The hard term is as in `kd_loss`.
    """
    _check(temperature, alpha)
    if convention not in CONVENTIONS:
        raise SoftlabelsError(f"the sparse loss convention must be one of {CONVENTIONS}, got "
                              f"{convention!r}")
    log_q = tempered_log_softmax(student_logits, temperature)
    log_q_sel = log_q.gather(1, classes)
    w = at_least_float32(weights)
    if convention == "residual":
        r = (1 - w.sum(-1)).clamp_min(0)
        q_rest = (1 - log_q_sel.exp().sum(-1)).clamp_min(1e-12)
        soft = (torch.xlogy(w, w) - w * log_q_sel).sum(-1) + torch.xlogy(r, r) - r * q_rest.log()
    elif convention == "zero":
        p = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
        soft = (torch.xlogy(p, p) - p * log_q_sel).sum(-1)
    else:
        if log_p is None:  # sampled: p_hat of each drawn class, its frequency among the draws
            log_p = (classes[:, :, None] == classes[:, None, :]).float().mean(-1).log()
        soft = (w * (at_least_float32(log_p) - log_q_sel)).sum(-1)
    soft = temperature**2 * soft.mean()
    if labels is None:
        return soft
    hard = F.cross_entropy(at_least_float32(student_logits), labels, ignore_index=-1,
                           reduction="sum") / len(labels)
    return alpha * soft + (1 - alpha) * hard


def target_convention(kind: str, topk_loss: str = "residual") -> str:
    """The `sparse_kd_loss` convention of a set's target kind: top-k sets take the chosen
    `topk_loss`; sampled and hybrid targets are unbiased estimates."""
    return topk_loss if kind == "topk" else "estimate"


def sequence_kd_loss(student_logits: torch.Tensor, batch: SequenceBatch, *,
                     temperature: float = 1.0, alpha: float = 0.9,
                     topk_loss: str = "residual") -> torch.Tensor:
    """Hinton KD per position:

        alpha * T^2 * mean_m KL(p_T || softmax(s / T)) + (1 - alpha) * mean_l CE(y, softmax(s))

    m runs over the masked-in positions (each has soft targets), l over the masked-in positions
    that have a hard target (label >= 0: a sequence's last position has no next token). Each
    term is its own mean at every alpha, so the loss is continuous as alpha -> 0; alpha = 0, or
    a "hard" batch, is the hard term alone. p_T are the stored targets: top-k exact
    probabilities under the `topk_loss` convention (`residual` or `zero`), sampled or hybrid
    targets (unbiased estimates), or dense probabilities (see `sparse_kd_loss`,
    `kd_loss_from_probs`). Only the masked-in rows of the (B, L, V) logits are used.
    """
    m = batch.mask.reshape(-1)
    if not m.any():  # a batch of masked-out sequences: nothing to distil, no gradient
        return student_logits.sum() * 0
    z = student_logits.reshape(-1, student_logits.shape[-1])[m]
    labels = batch.labels.reshape(-1)[m]
    if not len(z):  # nothing distilled in this batch (e.g. one-token sequences): no loss, not NaN
        return student_logits.sum() * 0
    hard = labelled_cross_entropy(z, labels)
    if batch.kind == "hard" or alpha == 0:
        return hard
    if batch.kind == "dense":
        soft = kd_loss_from_probs(z, batch.probs.reshape(-1, batch.probs.shape[-1])[m],
                                  temperature=temperature)
    else:
        k = batch.classes.shape[-1]
        log_p = None if batch.log_p is None else batch.log_p.reshape(-1, k)[m]
        soft = sparse_kd_loss(z, batch.classes.reshape(-1, k)[m],
                              batch.weights.reshape(-1, k)[m], log_p, temperature=temperature,
                              convention=target_convention(batch.kind, topk_loss))
    return alpha * soft + (1 - alpha) * hard

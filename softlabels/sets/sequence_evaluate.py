"""Evaluate a sequence (language-model) student on token data: per-token cross-entropy,
perplexity and next-token accuracy (`sequence_trainer.evaluate_sequence_model`, the function
training's --val-data and the tiny_lm main job score with), and, against a sequence set of the
same data, how close it comes to the teacher's stored targets at one temperature T.

What "close to the teacher" can mean depends on what the set stores (`teacher_metrics`):

- dense: `teacher_agreement` (student top-1 = teacher top-1) and `kl_to_teacher`, the exact
  mean KL(p_T || softmax(s / T)) in nats;
- top-k: `teacher_agreement` (exact: the largest stored probability is the teacher's top-1)
  and `kl_to_teacher_topk`, the KL over k + 1 buckets (the k stored classes and one for the
  rest, as the top-k loss uses). Merging classes never raises a KL, so it is a lower bound on
  the full KL;
- sampled: neither the teacher's top-1 nor its entropy is stored, so no agreement and no KL:
  `teacher_cross_entropy`, the mean over the stored draws c ~ p_T of -log softmax(s / T)_c,
  an unbiased estimate of the cross-entropy H(p_T, softmax(s / T)) = KL + H(p_T);
- hybrid: `teacher_agreement` (exact: the teacher's top-1 is in the head) and `kl_to_teacher`,
  an unbiased estimate of the full KL from the head's exact terms and the tail's weighted
  draws (format/targets.py).

Every measure is averaged over the positions the set distils (its mask).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import MismatchError, SoftlabelsError
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.sequence import is_sequence_set, read_offsets
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_model
from softlabels.tempering import tempered_log_softmax
from softlabels.train.datasets import check_alignment
from softlabels.train.losses import sparse_kd_loss
from softlabels.train.metrics import kl_to_teacher, teacher_agreement
from softlabels.train.sequence_batches import (
    MAX_IN_MEMORY,
    SequenceBatch,
    SequenceBatches,
    StreamingSequenceBatches,
    check_tokens,
    target_bytes,
)
from softlabels.train.sequence_trainer import check_sequence_student, evaluate_sequence_model

LOGITS_BUDGET = 1 << 28  # bytes of float32 (B, L, C) student logits per evaluation batch
TEACHER_KEYS = {"dense": ("teacher_agreement", "kl_to_teacher"),
                "topk": ("teacher_agreement", "kl_to_teacher_topk"),
                "sample": ("teacher_cross_entropy",),
                "hybrid": ("teacher_agreement", "kl_to_teacher")}


def evaluate_sequence_student(
    data: str | Dataset,
    model: str | nn.Module,
    *,
    transfer_set: str | os.PathLike[str] | TransferSet | None = None,
    temperature: float | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    trust_code: bool = False,
) -> dict[str, Any]:
    """cross_entropy (nats per token), perplexity, token_accuracy, positions (scored: those
    the mask keeps that have a next token) and sequences, over every sequence of `data`
    (`tokens:...`). With `transfer_set`, a sequence set made from `data` (checked), also the
    `teacher_metrics` at `temperature` (default 1 where the set holds it, else its first stored
    T) over the set's distilled positions, with teacher_temperature, teacher_targets (dense,
    topk, sample) and teacher_positions. `batch_size` sequences a batch (default: as many, up
    to 64, as keep the student's float32 logits of the longest within LOGITS_BUDGET)."""
    dataset = load_data(data) if isinstance(data, str) else data
    name = data if isinstance(data, str) else type(data).__name__
    if not isinstance(dataset, TokenSequences):
        raise MismatchError(f"{name} is not token sequences; a sequence model is evaluated on "
                            "tokens:... DATA")
    net = load_model(model, trust_code=trust_code)[0] if isinstance(model, str) else model
    dev = resolve_device(device)
    own = transfer_set is not None and not isinstance(transfer_set, TransferSet)
    ts = open_transfer_set(transfer_set) if own else transfer_set
    try:
        if ts is not None and not is_sequence_set(ts):
            raise MismatchError(f"--data {name} is token sequences but {ts.path} is an example "
                                "set (one row per example); pass a sequence set made from this "
                                "data (precompute --data tokens:...)")
        classes = _check_student(net, dataset, None if ts is None else ts.num_classes,
                                 where=None if ts is None else f"{ts.path} has "
                                 f"{ts.num_classes} classes")
        if batch_size is None:
            per_sequence = 4 * classes * int(dataset.lengths.max())
            batch_size = int(min(64, max(1, LOGITS_BUDGET // per_sequence)))
        held = SequenceBatches.from_tokens(dataset, batch_size=batch_size, shuffle=False,
                                           num_classes=classes)
        report: dict[str, Any] = dict(evaluate_sequence_model(net, held, device=str(dev)))
        report["sequences"] = len(dataset)
        if ts is not None:
            report.update(_against(net, dataset, ts, temperature, batch_size, dev))
    finally:
        if own and ts is not None:
            ts.close()
    return report


def _check_student(net: nn.Module, data: TokenSequences, classes: int | None, *,
                   where: str | None) -> int:
    """The student's classes per token, after refusing one that cannot score `data`: the
    probe is the longest sequence with its first token the largest id."""
    longest = int(np.argmax(data.lengths))
    probe = data[longest]
    probe[0] = int(data.tokens.max())
    return check_sequence_student(net, probe, classes, where=where or "")


def _against(net: nn.Module, data: TokenSequences, ts: TransferSet, temperature: float | None,
             batch_size: int, dev: torch.device) -> dict[str, Any]:
    """The teacher measures over every sequence of `ts`, after checking they are `data`'s."""
    if temperature is None:  # T = 1, as the example evaluate, when the set can serve it
        temperature = 1.0 if not ts.sparse or ts.temperature_index(1.0) is not None \
            else ts.temperatures[0]
    offsets = read_offsets(ts)
    check_alignment(data, ts, offsets[:-1])
    check_tokens(data, ts, offsets)
    common = dict(temperature=temperature, batch_size=batch_size, shuffle=False)
    batches: SequenceBatches | StreamingSequenceBatches = (
        StreamingSequenceBatches(ts, **common) if target_bytes(ts) > MAX_IN_MEMORY
        else SequenceBatches(ts, **common))  # type: ignore[arg-type]
    out = teacher_metrics(net, batches, temperature=float(temperature), device=str(dev))
    return {**out, "teacher_temperature": float(temperature)}


@torch.no_grad()
def teacher_metrics(model: nn.Module, batches: SequenceBatches | StreamingSequenceBatches, *,
                    temperature: float, device: str = "auto") -> dict[str, Any]:
    """The student's closeness to a sequence set's stored targets at `temperature`, averaged
    over the masked-in positions of `batches` (made at that temperature): see the module's
    docstring for what each kind of set allows."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    sums: dict[str, float] = {}
    count, kind = 0, batches.kind
    for batch in batches:
        batch = batch.to(dev)
        m = batch.mask.reshape(-1)
        z = model(batch.tokens)
        z = z.reshape(-1, z.shape[-1])[m].float()
        n = len(z)
        if n == 0:
            continue
        for key, value in _position_means(z, batch, m, kind, temperature).items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    if count == 0:
        raise SoftlabelsError("the set distils no position (its mask is all 0): there is "
                              "nothing to compare with the teacher; pass a set with distilled "
                              "positions")
    return {**{k: sums[k] / count for k in TEACHER_KEYS[kind]}, "teacher_targets": kind,
            "teacher_positions": count}


def _position_means(z: torch.Tensor, batch: SequenceBatch, m: torch.Tensor, kind: str,
                    t: float) -> dict[str, float]:
    """Means over the n masked-in positions of one batch; z (n, C) the student's logits."""
    if kind == "dense":
        p = batch.probs.reshape(-1, batch.probs.shape[-1])[m]
        # softmax(z / T) is the student at T: kl_to_teacher's T = 1 on logits z / T
        return {"teacher_agreement": teacher_agreement(z, p),
                "kl_to_teacher": kl_to_teacher(z / t, p)}
    k = batch.classes.shape[-1]
    classes, weights = batch.classes.reshape(-1, k)[m], batch.weights.reshape(-1, k)[m]
    if kind == "topk":
        top1 = classes.gather(1, weights.argmax(-1, keepdim=True))[:, 0]
        kl = sparse_kd_loss(z, classes, weights, temperature=t, convention="residual") / t**2
        return {"teacher_agreement": float((z.argmax(-1) == top1).float().mean()),
                "kl_to_teacher_topk": float(kl)}
    if kind == "hybrid":  # every stored class has its exact log p: the top one is the head's
        log_p = batch.log_p.reshape(-1, k)[m]
        top1 = classes.gather(1, log_p.masked_fill(weights <= 0, -torch.inf)
                              .argmax(-1, keepdim=True))[:, 0]
        kl = sparse_kd_loss(z, classes, weights, log_p, temperature=t,
                            convention="estimate") / t**2
        return {"teacher_agreement": float((z.argmax(-1) == top1).float().mean()),
                "kl_to_teacher": float(kl)}
    log_q = tempered_log_softmax(z, t).gather(1, classes)
    return {"teacher_cross_entropy": float(-log_q.mean())}

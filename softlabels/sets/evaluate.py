"""Evaluate a student, one entry for every kind of row (`evaluate`); what a kind measures is
its `Evaluation` in `KINDS`, chosen once by the set's (or the data's) kind.

Examples: accuracy, errors per class and calibration; against a transfer set of the same data,
agreement with and KL to the teacher at T = 1; optionally after adding constants to class
biases (Hinton et al. 2015, §3).

Sequences (a language-model student on `tokens:...` DATA): per-token cross-entropy,
perplexity and next-token accuracy (`metrics.evaluate_sequence_model`, the function training's
--val-data scores with), and, against a sequence set of the same data, how close it comes to
the teacher's stored targets at one temperature T. What "close" can mean depends on what the
set stores (`teacher_metrics`):

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
  draws (format/targets/hybrid.py).

Every sequence measure is averaged over the positions the set distils (its mask).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import MismatchError, OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.sequence import read_offsets
from softlabels.sources.images import model_inputs
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_model
from softlabels.tempering import tempered_log_softmax
from softlabels.train.batches import row_kind
from softlabels.train.blocks import block_targets, check_servable, needed_arrays
from softlabels.train.datasets import check_alignment
from softlabels.train.losses import sparse_kd_loss
from softlabels.train.metrics import (
    accuracy_report,
    evaluate_sequence_model,
    expected_calibration_error,
    kl_to_teacher,
    teacher_agreement,
)
from softlabels.train.padded import (
    MAX_IN_MEMORY,
    SequenceBatch,
    SequenceBatches,
    StreamingSequenceBatches,
    check_tokens,
    target_bytes,
)
from softlabels.train.plans import materialize, predict
from softlabels.train.students import check_outputs, check_sequence_student

LOGITS_BUDGET = 1 << 28  # bytes of float32 (B, L, C) student logits per evaluation batch
TEACHER_KEYS = {"dense": ("teacher_agreement", "kl_to_teacher"),
                "topk": ("teacher_agreement", "kl_to_teacher_topk"),
                "sample": ("teacher_cross_entropy",),
                "hybrid": ("teacher_agreement", "kl_to_teacher")}


def evaluate(
    data: str | Dataset,
    model: str | nn.Module,
    *,
    bias_adjust: Mapping[int, float] | None = None,
    transfer_set: str | os.PathLike[str] | TransferSet | None = None,
    device: str = "auto",
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    trust_code: bool = False,
    temperature: float | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The report of a student on `data` (and against `transfer_set`, a set of the same data).

    Examples: accuracy, errors, n, per_class_errors, ece; with `transfer_set`:
    teacher_agreement and kl_to_teacher (mean KL(teacher || student) at T = 1) over the set's
    rows. `inputs`: the data's (inputs, labels) tensors when already materialised.

    Token sequences (`tokens:...` DATA, or a sequence set): cross_entropy (nats per token),
    perplexity, token_accuracy, positions (scored: those the mask keeps that have a next token)
    and sequences; with a sequence set, also the `teacher_metrics` at `temperature` (default 1
    where the set holds it, else its first stored T) over the set's distilled positions, with
    teacher_temperature, teacher_targets and teacher_positions. `batch_size` sequences a batch
    (default: as many, up to 64, as keep the student's float32 logits of the longest within
    LOGITS_BUDGET). `temperature` applies only there, `bias_adjust` only to examples.

    A model with NaN/inf weights is refused; a checkpoint's python: spec runs only with
    `trust_code`."""
    own = transfer_set is not None and not isinstance(transfer_set, TransferSet)
    with (open_transfer_set(transfer_set) if own else contextlib.nullcontext(transfer_set)) as ts:
        name = data if isinstance(data, str) else type(data).__name__
        kind = KINDS[row_kind(name, data, ts)]
        kind.check_options(bias_adjust=bias_adjust, temperature=temperature)
        net = _finite(model, trust_code)
        return kind.report(data, name, net, ts, dev=resolve_device(device),
                           bias_adjust=bias_adjust or {}, inputs=inputs,
                           temperature=temperature, batch_size=batch_size)


class Evaluation(Protocol):
    """What one kind of row measures of a student (`KINDS`)."""

    @staticmethod
    def check_options(*, bias_adjust: Mapping[int, float] | None,
                      temperature: float | None) -> None:
        """Refuse options this kind has no use for."""

    @staticmethod
    def report(data: str | Dataset, name: str, net: nn.Module, ts: TransferSet | None, *,
               dev: torch.device, bias_adjust: Mapping[int, float],
               inputs: tuple[torch.Tensor, torch.Tensor] | None, temperature: float | None,
               batch_size: int | None) -> dict[str, Any]: ...


def _finite(model: str | nn.Module, trust_code: bool) -> nn.Module:
    net = load_model(model, trust_code=trust_code)[0] if isinstance(model, str) else model
    if not all(torch.isfinite(t).all() for t in net.state_dict().values()
               if t.is_floating_point()):
        raise SoftlabelsError("the model has NaN or inf weights (a diverged run); retrain it")
    return net


# --- one row per example --------------------------------------------------------------------

def adjust_bias(logits: torch.Tensor, bias_adjust: Mapping[int, float]) -> torch.Tensor:
    """Add a constant to chosen classes' logits: the same as adding it to their output bias
    (Hinton et al. 2015, §3: +3.5 on digit 3 recovers a class omitted from the transfer set)."""
    out = logits.clone()
    for k, v in bias_adjust.items():
        if not 0 <= k < out.shape[-1]:
            raise SoftlabelsError(f"--bias-adjust names class {k}, but the model has "
                                  f"{out.shape[-1]} classes; name a class in "
                                  f"[0, {out.shape[-1]})")
        out[:, k] += v
    return out


class ExampleEvaluation:
    @staticmethod
    def check_options(*, bias_adjust: Mapping[int, float] | None,
                      temperature: float | None) -> None:
        if temperature is not None:
            raise OptionError("--temperature picks the targets of a sequence set; an example "
                              "student is compared with its teacher at T = 1: drop it")

    @staticmethod
    def report(data: str | Dataset, name: str, net: nn.Module, ts: TransferSet | None, *,
               dev: torch.device, bias_adjust: Mapping[int, float],
               inputs: tuple[torch.Tensor, torch.Tensor] | None, temperature: float | None,
               batch_size: int | None) -> dict[str, Any]:
        dataset = model_inputs(load_data(data) if isinstance(data, str) else data)
        x, y = inputs if inputs is not None else materialize(dataset)
        check_outputs(net, x[:1].to(dev), None, y,
                      sequence_hint="is evaluated on token sequences: pass tokens:... DATA")
        logits = adjust_bias(predict(net.to(dev), x, dev), bias_adjust)
        report: dict[str, Any] = accuracy_report(logits, y)
        report["ece"] = expected_calibration_error(logits, y)
        if ts is not None:
            if ts.num_classes != logits.shape[-1]:
                raise SoftlabelsError(f"the model predicts {logits.shape[-1]} classes, "
                                      f"{ts.path} has {ts.num_classes}")
            check_alignment(dataset, ts, torch.arange(ts.num_rows).numpy())
            index, teacher = _teacher_at_1(ts)
            rows_logits = logits[torch.from_numpy(index)]
            report["teacher_agreement"] = teacher_agreement(rows_logits, teacher)
            report["kl_to_teacher"] = kl_to_teacher(rows_logits, teacher)
            report["teacher_targets"] = ts.target.name  # what "the teacher" was read from
        return report


def _teacher_at_1(ts: TransferSet) -> tuple[np.ndarray, torch.Tensor]:
    """Every row's dataset index and the teacher's (rows, C) probabilities at T = 1 (stored,
    re-tempered from the logits, or densified from sparse targets), reading only those arrays,
    checked block by block (`TransferSet.read_block`: damage stops here, naming its block)."""
    check_servable(ts, 1.0)
    names = [n for n in needed_arrays(ts, 1.0) if n not in (S.LABELS, S.VIEW_SEED)]
    stored = ts.temperature_index(1.0) is not None
    index, probs = [], []
    for block in range(ts.num_blocks):
        arrays = ts.read_block(block, names, temperature=1.0 if stored else None)
        targets = block_targets(ts, arrays, 1.0)
        index.append(arrays[S.INDEX])
        probs.append(targets[0] if len(targets) == 1 else ts.densify(*targets[:2]))
    return np.concatenate(index), torch.from_numpy(np.concatenate(probs))


# --- one row per token position -------------------------------------------------------------

class SequenceEvaluation:
    @staticmethod
    def check_options(*, bias_adjust: Mapping[int, float] | None,
                      temperature: float | None) -> None:
        if bias_adjust:
            raise OptionError("--bias-adjust applies to example models; drop it for token "
                              "sequences")

    @staticmethod
    def report(data: str | Dataset, name: str, net: nn.Module, ts: TransferSet | None, *,
               dev: torch.device, bias_adjust: Mapping[int, float],
               inputs: tuple[torch.Tensor, torch.Tensor] | None, temperature: float | None,
               batch_size: int | None) -> dict[str, Any]:
        dataset = load_data(data) if isinstance(data, str) else data
        if not isinstance(dataset, TokenSequences):
            where = (f"{ts.path} is a sequence set (one row per token of "
                     f"{ts.layout.num_sequences} sequences) but --data " if ts is not None
                     else "")
            raise MismatchError(f"{where}{name} is not token sequences; a sequence model is "
                                "evaluated on tokens:... DATA")
        classes = _check_student(net, dataset, None if ts is None else ts.num_classes,
                                 where=None if ts is None else f"{ts.path} has "
                                 f"{ts.num_classes} classes", dev=dev)
        if batch_size is None:
            per_sequence = 4 * classes * int(dataset.lengths.max())
            batch_size = int(min(64, max(1, LOGITS_BUDGET // per_sequence)))
        held = SequenceBatches.from_tokens(dataset, batch_size=batch_size, shuffle=False,
                                           num_classes=classes)
        report: dict[str, Any] = dict(evaluate_sequence_model(net, held, device=str(dev)))
        report["sequences"] = len(dataset)
        if ts is not None:
            report.update(_against(net, dataset, ts, temperature, batch_size, dev))
        return report


KINDS: dict[str, type[ExampleEvaluation] | type[SequenceEvaluation]] = {
    "examples": ExampleEvaluation, "sequences": SequenceEvaluation}  # format.layout.ROW_KINDS


def _check_student(net: nn.Module, data: TokenSequences, classes: int | None, *,
                   where: str | None, dev: torch.device) -> int:
    """The student's classes per token, after refusing one that cannot score `data`: the
    probe is the longest sequence with its first token the largest id."""
    longest = int(np.argmax(data.lengths))
    probe = data[longest]
    probe[0] = int(data.tokens.max())
    return check_sequence_student(net.to(dev), probe, classes, where=where or "", device=dev)


def _against(net: nn.Module, data: TokenSequences, ts: TransferSet, temperature: float | None,
             batch_size: int, dev: torch.device) -> dict[str, Any]:
    """The teacher measures over every sequence of `ts`, after checking they are `data`'s."""
    if temperature is None:  # T = 1, as the example evaluate, when the set can serve it
        temperature = 1.0 if not ts.target.sparse or ts.temperature_index(1.0) is not None \
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

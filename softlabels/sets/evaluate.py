"""Evaluate a student: accuracy and errors, and against a transfer set of the same data, its
agreement with and KL to the teacher; optionally after adding constants to class biases."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.sources.images import model_inputs
from softlabels.sources.load import load_data
from softlabels.sources.tokens import is_sequence_data
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_model
from softlabels.train.blocks import block_targets, check_servable, needed_arrays
from softlabels.train.datasets import check_alignment
from softlabels.train.metrics import (
    accuracy_report,
    expected_calibration_error,
    kl_to_teacher,
    teacher_agreement,
)
from softlabels.train.plans import check_outputs, materialize
from softlabels.train.trainer import predict


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


def evaluate(
    data: str | Dataset,
    model: str | nn.Module,
    *,
    bias_adjust: Mapping[int, float] | None = None,
    transfer_set: str | os.PathLike[str] | None = None,
    device: str = "auto",
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    trust_code: bool = False,
    temperature: float | None = None,
) -> dict[str, Any]:
    """accuracy, errors, n, per_class_errors, ece; with `transfer_set`: teacher_agreement and
    kl_to_teacher (mean KL(teacher || student) at T = 1) over the set's rows.

    On token sequences (`tokens:...` DATA) a sequence student is scored instead
    (`sequence_evaluate.evaluate_sequence_student`: cross_entropy, perplexity, token_accuracy;
    with a sequence set, its teacher measures at `temperature`, which applies only there).
    A model with NaN/inf weights is refused; a checkpoint's python: spec runs only with
    `trust_code`."""
    if is_sequence_data(data):  # a sequence (language-model) student
        if bias_adjust:
            raise OptionError("--bias-adjust applies to example models; drop it for token "
                              "sequences")
        from softlabels.sets.sequence_evaluate import evaluate_sequence_student

        return evaluate_sequence_student(data, _finite(model, trust_code),
                                         transfer_set=transfer_set, temperature=temperature,
                                         device=device)
    if temperature is not None:
        raise OptionError("--temperature picks the targets of a sequence set; an example "
                          "student is compared with its teacher at T = 1: drop it")
    with (open_transfer_set(transfer_set) if transfer_set is not None
          else contextlib.nullcontext()) as ts:
        if ts is not None:
            _refuse_sequence_set(ts)
        dev = resolve_device(device)
        net = _finite(model, trust_code)
        dataset = model_inputs(load_data(data) if isinstance(data, str) else data)
        x, y = inputs if inputs is not None else materialize(dataset)
        check_outputs(net, x[:1].to(dev), None, y,
                      sequence_hint="is evaluated on token sequences: pass tokens:... DATA")
        logits = adjust_bias(predict(net.to(dev), x, dev), bias_adjust or {})
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


def _finite(model: str | nn.Module, trust_code: bool) -> nn.Module:
    net = load_model(model, trust_code=trust_code)[0] if isinstance(model, str) else model
    if not all(torch.isfinite(t).all() for t in net.state_dict().values()
               if t.is_floating_point()):
        raise SoftlabelsError("the model has NaN or inf weights (a diverged run); retrain it")
    return net


def _refuse_sequence_set(ts: TransferSet) -> None:
    if ts.layout.num_sequences:
        raise SoftlabelsError(
            f"{ts.path} is a sequence set (one row per token of {ts.layout.num_sequences} "
            "sequences): --transfer-set expects an example set of the same DATA; pass one, or "
            "evaluate a sequence model on the tokens:... DATA the set was made from")

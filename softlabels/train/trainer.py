"""Stage two: train a student from stored soft targets (or from hard labels, for teachers and
baselines). The teacher is never loaded: its outputs come from the transfer set.

One loop for every kind of row (`fit`): optimizer steps, epochs, the learning-rate schedule,
the state saved after each epoch (and mid-epoch) and resumed, progress, the finite-loss check,
the record written with the checkpoint, ranks. What differs by kind (how batches are cut, what
a batch's input and targets are, the loss, the student checks, the held-out metrics) is the
`batches.Rows` of the run's kind, chosen once from `batches.KINDS`."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import DataError, SoftlabelsError, TrainingError
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.input_proof import input_digests
from softlabels.options import TrainOptions, check_output_file
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_model, save_checkpoint
from softlabels.tempering import check_temperature
from softlabels.train.batches import KINDS, Rows, SequenceRows, row_kind
from softlabels.train.padded import SequenceBatches, StreamingSequenceBatches
from softlabels.train.ranks import finish_distributed, init_distributed, summed, wrap_ddp
from softlabels.train.record import Callback, TrainResult
from softlabels.train.resume import (
    Keep,
    clear_state,
    load_state,
    mid_epoch,
    restore,
    run_digest,
    save_state,
    steps_taken,
)
from softlabels.train.run import Run

log = logging.getLogger(__name__)
# train_sequence_model's defaults where they differ from TrainOptions'
SEQUENCE_DEFAULTS: dict[str, Any] = {"epochs": 1, "lr": 3e-3, "temperature": 1.0, "alpha": 0.9}


def train_student(
    data: str | Dataset,
    model: str,
    options: TrainOptions | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    transfer_set: str | os.PathLike[str] | TransferSet | None = None,
    indices: str | os.PathLike[str] | np.ndarray | None = None,
    val_data: str | Dataset | None = None,
    stream: bool | None = None,
    resume: bool = True,
    callbacks: Sequence[Callback] = (),
    **kwargs: Any,
) -> TrainResult:
    """Train `model` (a MODEL spec, or a checkpoint to fine-tune) on `data`.

    Options come as a `TrainOptions`, or as its fields by keyword (temperature, alpha, epochs,
    batch_size, lr, optimizer, weight_decay, seed, fraction, classes, exclude_classes,
    jitter_pixels, device, distributed, views_per_epoch, trust_code).
    With `transfer_set`, the loss is Hinton KD at `temperature` (default: the set's first stored
    T) against the stored soft targets, weighted by `alpha` (default 0.9); rows without a label
    take the soft term alone. Without it, cross-entropy on hard labels (and `temperature` or
    `alpha` is an error). Subset options select rows of the set and of the data together. The
    same seed gives the same model. With `distributed` (under torchrun), each rank trains on a
    disjoint share of every epoch through DDP; rank 0 saves. From a view set, each epoch trains
    on `views_per_epoch` stored views of every example, drawn afresh per epoch and replayed
    exactly as the teacher saw them. A non-finite loss stops training; nothing is saved.
    `batch_size` is per rank: with N ranks one optimizer step sees N * batch_size rows (the
    checkpoint records both). Every rank takes the same number of steps per epoch.

    On token sequences (a sequence set, or `tokens:...` DATA) the student maps (B, L) token
    ids to (B, L, C) logits and trains on batches of whole sequences (`batches.SequenceRows`:
    AdamW, cosine decay; `--fraction`/`--indices` select whole sequences).

    Targets are loaded into memory when they fit (MAX_IN_MEMORY), else streamed in whole
    batches from whole blocks; `stream` forces either. Every block read is checked (checksum,
    finite targets, labels in range): a damaged set raises `IntegrityError` naming the block
    before any step is taken on it. With `out` and `resume`, the state after each epoch (and
    every `state_every` steps) goes to `<out>.state` with the digests of the data and
    `indices` files; rerunning the same call after a kill continues where it stopped (see
    `softlabels.train.resume`), and refuses inputs changed since.
    """
    t0 = time.perf_counter()
    if options is not None and kwargs:
        raise TypeError(f"pass a TrainOptions or keyword options, not both (got {sorted(kwargs)})")
    opts = options if options is not None else TrainOptions(**kwargs)
    opts.check_distillation(transfer_set is not None)
    if out is not None:
        check_output_file(out, checkpoint=True)  # before any work, not after epochs
    own = transfer_set is not None and not isinstance(transfer_set, TransferSet)
    with (open_transfer_set(transfer_set) if own else contextlib.nullcontext(transfer_set)) as ts:
        temperature = opts.temperature  # checked by TrainOptions
        if ts is not None and temperature is None:  # the set's first, under the options' cap
            temperature = check_temperature(ts.temperatures[0], "the set's first temperature")
        name = data if isinstance(data, str) else type(data).__name__
        kind = KINDS[row_kind(name, data, ts)]
        kind.check_options(opts)
        dev = resolve_device(opts.device)
        rank, world = init_distributed(dev) if opts.distributed else (0, 1)
        torch.manual_seed(opts.seed)
        net, spec = load_model(model, trust_code=opts.trust_code)
        net = net.to(dev)
        run = Run(data=data, name=name, opts=opts, ts=ts, temperature=temperature,
                  indices=indices, val_data=val_data, stream=stream, dev=dev,
                  gen=torch.Generator().manual_seed(opts.seed), rank=rank, world=world)
        rows = kind.open(run, net)
        digest = run_digest({
            "data": name, "model": model,
            "transfer_set": None if ts is None else [
                str(ts.path), ts.info.created_at, ts.info.dataset.fingerprint],
            "temperature": rows.temperature, "alpha": rows.alpha, "batch_size": opts.batch_size,
            "lr": opts.lr, "optimizer": opts.optimizer, "weight_decay": opts.weight_decay,
            "seed": opts.seed, "stream": rows.streamed, "topk_loss": opts.topk_loss,
            **rows.digest})
        meta: dict[str, Any] = {"rows": rows.rows, "seed": opts.seed, "epochs": opts.epochs,
                                "batch_size": opts.batch_size, "streamed": rows.streamed,
                                "data": name, **rows.meta}
        if ts is not None:
            meta["transfer_set"] = {"path": str(ts.path), "temperature": rows.temperature,
                                    "alpha": rows.alpha,
                                    "fingerprint": ts.info.dataset.fingerprint}
        resumable = out is not None and resume
        inputs = input_digests(data, indices=indices if isinstance(indices, (str, os.PathLike))
                               else None) if resumable else None
        result = fit(net, spec, rows, epochs=opts.epochs, dev=dev, gen=run.gen,
                     keep=Keep(out, digest if resumable else None, inputs, opts.state_every,
                               meta),
                     rank=rank, world=world, callbacks=callbacks, t0=t0)
    if opts.distributed:
        finish_distributed()
    return result


def train_sequence_model(
    model: str | nn.Module,
    batches: SequenceBatches | StreamingSequenceBatches,
    options: TrainOptions | None = None,
    *,
    clip: float = 1.0,
    out: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
    val: SequenceBatches | None = None,
    spec: str | None = None,
    meta: dict[str, Any] | None = None,
    state_digest: str | None = None,
    **kwargs: Any,
) -> TrainResult:
    """`fit` a sequence model (a MODEL spec, or a module) on ready `batches` (`SequenceBatches`
    or `StreamingSequenceBatches`) with `sequence_kd_loss`: AdamW, cosine learning-rate decay,
    gradients clipped to `clip` (`batches.SequenceRows`). Options come as a `TrainOptions`, or
    as its fields by keyword (epochs, lr, weight_decay, temperature, alpha, topk_loss, seed,
    device; here epochs defaults to 1, lr to 3e-3, temperature to 1 and alpha to 0.9), checked
    as `train_student` checks them. With `val`, each epoch records the held-out perplexity and
    token accuracy. A module saved to `out` needs the MODEL `spec` it was built from; `meta`
    goes into the checkpoint. With `out` and `state_digest` (what identifies the run,
    `resume.run_digest`), a rerun continues where a killed one stopped."""
    if options is not None and kwargs:
        raise TypeError(f"pass a TrainOptions or keyword options, not both (got {sorted(kwargs)})")
    opts = options if options is not None else TrainOptions(**{**SEQUENCE_DEFAULTS, **kwargs})
    SequenceRows.check_options(opts)
    temperature = 1.0 if opts.temperature is None else opts.temperature
    alpha = 0.9 if opts.alpha is None else opts.alpha
    if out is not None and not isinstance(model, str) and spec is None:
        raise SoftlabelsError("a checkpoint rebuilds its model from a MODEL spec: pass the "
                              "model as a spec (e.g. python:package.module:factory) to save it")
    t0 = time.perf_counter()
    dev = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    if isinstance(model, str):
        net, spec = load_model(model)
    else:
        net, spec = model, spec or f"object:{type(model).__qualname__}"
    rows = SequenceRows(batches=batches, dev=dev, temperature=temperature, alpha=alpha,
                        topk_loss=opts.topk_loss, lr=opts.lr, weight_decay=opts.weight_decay,
                        clip=clip, val=val)
    return fit(net.to(dev), spec, rows, epochs=opts.epochs, dev=dev, gen=torch.Generator(),
               keep=Keep(out, state_digest, meta={**(meta or {}), "alpha": alpha,
                                                  "temperature": temperature}),
               callbacks=callbacks, t0=t0)


def fit(net: nn.Module, spec: str, rows: Rows, *, epochs: int, dev: torch.device,
        gen: torch.Generator, keep: Keep, rank: int = 0, world: int = 1,
        callbacks: Sequence[Callback] = (), t0: float | None = None) -> TrainResult:
    """The one training loop: `epochs` of `rows`' batches, one optimizer step each.

    Each epoch's record is {epoch, loss (the mean over its rows or positions), rows|positions,
    steps (optimizer steps so far), held-out metrics}. With `keep.out` and `keep.digest`, the
    state goes to `<out>.state` after each epoch and every `keep.state_every` steps (rank 0),
    and a state of the same run (digest; `inputs` digests unchanged, else refused) is resumed,
    mid-epoch where it was saved so; the checkpoint at `out` carries `keep.meta` and the
    history."""
    t0 = time.perf_counter() if t0 is None else t0
    step_net = wrap_ddp(net, dev) if world > 1 else net
    stepper = rows.optimizer(net, epochs)
    out, digest, inputs, state_every = keep.out, keep.digest, keep.inputs, keep.state_every
    state = load_state(out, digest, inputs) if keep.states else None
    history: list[dict[str, Any]] = []
    start = step = 0
    resume_at, (total, seen) = None, (0.0, 0)
    if state is not None:
        start = restore(state, net, stepper.opt, gen)
        history, step = list(state["history"]), steps_taken(state)
        stepper.advance(step)
        resume_at, (total, seen) = mid_epoch(state)
        log.info("resuming %s after epoch %d of %d%s", out, start, epochs,
                 f", step {resume_at['batches']}" if resume_at else "")
    for epoch in range(start, epochs):
        net.train()
        first = resume_at["batches"] if resume_at and epoch == start else 0
        if not first:
            total, seen = 0.0, 0
        for b, batch in enumerate(rows.epoch(epoch, resume_at if first else None), start=first):
            loss, n = rows.loss(step_net, batch)
            if world > 1:  # all ranks stop together, or the rest would wait in backward
                _finite_loss(summed(loss), epoch, b)
            value = _finite_loss(loss.item(), epoch, b)
            stepper.opt.zero_grad(set_to_none=True)
            loss.backward()
            stepper.step(net)
            total, seen, step = total + value * n, seen + n, step + 1
            if (state_every and (b + 1) % state_every == 0 and b + 1 < rows.steps
                    and keep.states and rank == 0):
                save_state(out, digest=digest, epoch=epoch, history=history, model=net,
                           optimizer=stepper.opt, generator=gen, stream=rows.state_dict(),
                           partial=(total, seen), inputs=inputs, step=step)
            for cb in callbacks:
                cb("batch", {"epoch": epoch, "batch": b + 1, "batches": rows.steps,
                             "step": step, "loss": total / max(seen, 1)})
        if not seen:
            raise DataError(rows.nothing)
        record = {"epoch": epoch + 1, "loss": total / seen, rows.unit: seen, "steps": step,
                  **rows.score(net)}
        history.append(record)
        if keep.states and rank == 0:
            save_state(out, digest=digest, epoch=epoch + 1, history=history, model=net,
                       optimizer=stepper.opt, generator=gen, inputs=inputs, step=step)
        for cb in callbacks:
            cb("epoch", {**record, "epochs": epochs})
    net = net.cpu().eval()
    _check_weights(net, epochs)
    if out is not None and rank == 0:
        save_checkpoint(net, out, spec=spec, meta={**keep.meta, "history": history,
                                                   "resumed_after_epoch": start})
        clear_state(out)
    return TrainResult(model=net, spec=spec, history=history, rows=rows.rows, unit=rows.unit,
                       seconds=time.perf_counter() - t0, rank=rank)


def _finite_loss(value: float, epoch: int, step: int) -> float:
    """A NaN/inf loss stops training at once, named by epoch and step; nothing is saved."""
    if not math.isfinite(value):
        raise TrainingError(f"the loss is {value} at epoch {epoch + 1}, step {step + 1}: "
                            "training diverged and nothing was saved; check the data for "
                            "NaN/inf inputs, or lower --lr")
    return value


def _check_weights(net: nn.Module, epochs: int) -> None:
    """Never save a model with NaN/inf weights (a finite loss can still overflow a step)."""
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"after {epochs} epochs the weights {name!r} hold NaN or inf; "
                                "nothing was saved; lower --lr")

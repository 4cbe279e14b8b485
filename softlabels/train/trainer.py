"""Stage two: train a student from stored soft targets (or from hard labels, for teachers and
baselines). The teacher is never loaded: its outputs come from the transfer set. What each
epoch's batches are is train_plans.py's; this module runs the steps."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import DataError, OptionError, TrainingError
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.selection import read_indices
from softlabels.input_proof import input_digests
from softlabels.options import TrainOptions, check_output_file, check_temperature
from softlabels.sources.images import model_inputs
from softlabels.sources.load import load_data
from softlabels.sources.tokens import is_sequence_data
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_model, save_checkpoint
from softlabels.train.datasets import MAX_IN_MEMORY
from softlabels.train.losses import kd_loss_from_probs, sparse_kd_loss, target_convention
from softlabels.train.plans import (
    StreamedEpochs,
    hard_label_epochs,
    in_memory_epochs,
    materialize,
    streamed_epochs,
)
from softlabels.train.ranks import (
    finish_distributed,
    init_distributed,
    refuse_zero_steps,
    summed,
    wrap_ddp,
)
from softlabels.train.record import Callback, TrainResult
from softlabels.train.resume import (
    clear_state,
    load_state,
    mid_epoch,
    restore,
    run_digest,
    save_state,
)

log = logging.getLogger(__name__)





def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image (N, C, H, W) by up to `pixels` in x and y, filling with zeros."""
    if pixels <= 0 or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4)
    dy, dx = (torch.randint(0, 2 * pixels + 1, (2, n), generator=generator))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device,
            batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, C) of `model` in eval mode, on the CPU."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def _make_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> Any:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


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

    Targets are loaded into memory when they fit (MAX_IN_MEMORY), else streamed in whole
    batches from whole blocks (`SoftTargetBatches`); `stream` forces either. Every block read
    is checked (checksum, finite targets, labels in range): a damaged set raises
    `IntegrityError` naming the block before any step is taken on it. With `out` and `resume`,
    the state after each epoch goes to `<out>.state`; rerunning the same call after a kill
    continues from the last finished epoch (see `softlabels.train.resume`).
    """
    t0 = time.perf_counter()
    if options is not None and kwargs:
        raise TypeError(f"pass a TrainOptions or keyword options, not both (got {sorted(kwargs)})")
    opts = options if options is not None else TrainOptions(**kwargs)
    opts.check_distillation(transfer_set is not None)
    if out is not None:
        check_output_file(out, checkpoint=True)  # before any work, not after epochs
    epochs, batch_size, seed = opts.epochs, opts.batch_size, opts.seed
    alpha = 0.9 if opts.alpha is None else opts.alpha
    ts = None
    temperature = opts.temperature
    if transfer_set is not None:
        ts = (transfer_set if isinstance(transfer_set, TransferSet)
              else open_transfer_set(transfer_set))
        temperature = check_temperature(ts.temperatures[0] if temperature is None
                                        else temperature)
    if is_sequence_data(data) or (ts is not None and ts.layout.num_sequences):
        from softlabels.train.sequence_trainer import train_sequence_student  # one row per token

        return train_sequence_student(data, model, opts, out=out, transfer_set=ts,
                                      indices=indices, val_data=val_data, stream=stream,
                                      callbacks=callbacks, resume=resume)
    dev = resolve_device(opts.device)
    distributed = opts.distributed
    rank, world = init_distributed(dev) if distributed else (0, 1)
    torch.manual_seed(seed)
    net, spec = load_model(model, trust_code=opts.trust_code)
    net = net.to(dev)
    step_net = wrap_ddp(net, dev) if world > 1 else net
    dataset = model_inputs(load_data(data) if isinstance(data, str) else data)
    if len(dataset) == 0:
        raise DataError("the dataset is empty: there is nothing to train on; check --data")
    select = dict(fraction=opts.fraction, seed=seed, classes=opts.classes,
                  exclude_classes=opts.exclude_classes,
                  indices=read_indices(indices) if isinstance(indices, (str, os.PathLike))
                  else indices, num_examples=len(dataset))
    gen = torch.Generator().manual_seed(seed)
    if stream is None:
        stream = ts is not None and ts.num_rows * ts.num_classes * 4 > MAX_IN_MEMORY
    if (opts.loader_workers or opts.state_every) and not (stream and ts is not None):
        raise OptionError("--loader-workers and --state-every apply to a streamed set; pass "
                          "--transfer-set with --stream, or leave them out")
    if ts is None:
        plan = hard_label_epochs(dataset, net, dev, select, batch_size, gen, rank, world)
    elif not stream:
        plan = in_memory_epochs(dataset, ts, net, dev, select, temperature,
                                 opts.views_per_epoch, batch_size, gen, rank, world,
                                 trust_code=opts.trust_code)
    else:
        plan = streamed_epochs(dataset, ts, net, dev, select, temperature, batch_size, rank,
                                world, workers=opts.loader_workers)
    epoch_batches, n_rows, n_batches = plan
    if n_rows == 0:
        raise DataError("the selection leaves no rows to train on; widen --fraction, "
                        "--classes or --indices")
    refuse_zero_steps(n_batches, n_rows, world, streamed=bool(stream and ts is not None),
                      blocks=None if ts is None else ts.num_blocks)
    val = materialize(model_inputs(load_data(val_data) if isinstance(val_data, str)
                                   else val_data)) \
        if val_data is not None else None
    opt = _make_optimizer(opts.optimizer, net.parameters(), opts.lr, opts.weight_decay)
    history: list[dict[str, Any]] = []
    digest = run_digest({
        "data": data if isinstance(data, str) else type(data).__name__, "model": model,
        "transfer_set": None if ts is None else [str(ts.path), ts.meta.get("created_at"),
                                                 ts.meta["dataset"]["fingerprint"]],
        "temperature": temperature,
        "alpha": alpha, "batch_size": batch_size, "lr": opts.lr, "optimizer": opts.optimizer,
        "weight_decay": opts.weight_decay, "select": select, "jitter": opts.jitter_pixels,
        "views_per_epoch": opts.views_per_epoch, "world": world, "stream": stream,
        "topk_loss": opts.topk_loss})
    inputs = input_digests(data, indices=indices if isinstance(indices, (str, os.PathLike))
                           else None) if out is not None and resume else None
    state = load_state(out, digest, inputs) if out is not None and resume else None
    start = restore(state, net, opt, gen) if state is not None else 0
    resume_at, (total, seen) = mid_epoch(state) if state is not None else (None, (0.0, 0))
    if state is not None:
        history = list(state["history"])
        log.info("resuming %s after epoch %d of %d%s", out, start, epochs,
                 f", step {resume_at['batches']}" if resume_at else "")
    streamed = isinstance(epoch_batches, StreamedEpochs)
    for epoch in range(start, epochs):
        net.train()
        first = resume_at["batches"] if resume_at and epoch == start else 0
        if not first:
            total, seen = 0.0, 0
        batches = (epoch_batches(epoch, resume_at if first else None) if streamed
                   else epoch_batches(epoch))
        for b, batch in enumerate(batches, start=first):
            x, y = jitter(batch[0], opts.jitter_pixels, gen).to(dev), batch[1].to(dev)
            loss = _loss(step_net(x), y, [t.to(dev) for t in batch[2:]], ts, temperature,
                         alpha, opts.topk_loss)
            if world > 1:  # all ranks stop together, or the rest would wait in backward
                _finite_loss(summed(loss), epoch, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = _finite_loss(loss.item(), epoch, b)  # the sync this loop always had
            total, seen = total + value * len(x), seen + len(x)
            if (opts.state_every and (b + 1) % opts.state_every == 0 and b + 1 < n_batches
                    and out is not None and resume and rank == 0):
                save_state(out, digest=digest, epoch=epoch, history=history, model=net,
                           optimizer=opt, generator=gen, stream=epoch_batches.state_dict(),
                           partial=(total, seen), inputs=inputs)
            for cb in callbacks:
                cb("batch", {"epoch": epoch, "batch": b + 1, "batches": n_batches,
                             "loss": total / seen})
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": total / max(seen, 1)}
        if val is not None:
            pred = predict(net, val[0], dev).argmax(-1)
            known = val[1] >= 0
            record["val_accuracy"] = float((pred[known] == val[1][known]).float().mean())
        history.append(record)
        if out is not None and resume and rank == 0:
            save_state(out, digest=digest, epoch=epoch + 1, history=history, model=net,
                       optimizer=opt, generator=gen, inputs=inputs)
        for cb in callbacks:
            cb("epoch", {**record, "epochs": epochs})
    net = net.cpu().eval()
    _check_weights(net, epochs)
    result = TrainResult(model=net, spec=spec, history=history, rows=n_rows,
                         seconds=time.perf_counter() - t0, rank=rank)
    if distributed:
        finish_distributed()
    if out is not None and rank == 0:
        meta = {"history": history, "rows": n_rows, "seed": seed, "epochs": epochs,
                "world_size": world, "batch_size": batch_size, "batch_size_is": "per rank",
                "global_batch_size": batch_size * world, "streamed": bool(stream),
                "resumed_after_epoch": start,
                "data": data if isinstance(data, str) else type(data).__name__}
        if ts is not None:
            meta["transfer_set"] = {"path": str(ts.path), "temperature": temperature,
                                    "alpha": alpha,
                                    "fingerprint": ts.meta["dataset"]["fingerprint"]}
        save_checkpoint(net, out, spec=spec, meta=meta)
        clear_state(out)
    return result


def _loss(logits: torch.Tensor, y: torch.Tensor, targets: list[torch.Tensor],
          ts: TransferSet | None, temperature: float | None, alpha: float,
          topk_loss: str = "residual") -> torch.Tensor:
    """Hard-label CE without a set; Hinton KD against dense targets; sparse KD otherwise."""
    if ts is None:
        return F.cross_entropy(logits, y, ignore_index=-1)
    if ts.sparse:
        return sparse_kd_loss(logits, *targets, temperature=temperature, labels=y, alpha=alpha,
                              convention=target_convention(ts.sparse["kind"], topk_loss))
    return kd_loss_from_probs(logits, targets[0], temperature=temperature, labels=y,
                              alpha=alpha)


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

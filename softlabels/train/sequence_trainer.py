"""Stage two for sequences: train a sequence model (B, L) -> (B, L, V) from a sequence set's
stored targets (or from hard next tokens), and measure perplexity and token accuracy."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import DataError, MismatchError, OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.selection import read_indices
from softlabels.format.sequence import is_sequence_set, read_offsets
from softlabels.format.sequence_ops import select_sequences
from softlabels.options import TrainOptions
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_model, save_checkpoint
from softlabels.train.datasets import check_alignment
from softlabels.train.record import Callback, TrainResult
from softlabels.train.resume import clear_state, load_state, restore, run_digest, save_state
from softlabels.train.sequence_batches import (
    MAX_IN_MEMORY,
    SequenceBatches,
    StreamingSequenceBatches,
    check_tokens,
    sequence_kd_loss,
    target_bytes,
)

log = logging.getLogger(__name__)
Batches = SequenceBatches | StreamingSequenceBatches

@dataclass
class SequenceTrainResult:
    model: nn.Module
    spec: str
    history: list[dict[str, Any]] = field(default_factory=list)
    positions: int = 0
    seconds: float = 0.0


def train_sequence_model(
    model: str | nn.Module,
    batches: Batches,
    *,
    epochs: int = 1,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    temperature: float = 1.0,
    alpha: float = 0.9,
    topk_loss: str = "residual",
    clip: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    out: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
    val: Batches | None = None,
    spec: str | None = None,
    meta: dict[str, Any] | None = None,
    state_digest: str | None = None,
) -> SequenceTrainResult:
    """Train `model` (a MODEL spec, or a module) on `batches` (`SequenceBatches` or
    `StreamingSequenceBatches`) with `sequence_kd_loss`: AdamW, cosine learning-rate decay,
    gradients clipped to `clip`. The teacher is never loaded. The same seed gives the same
    model; a non-finite loss stops training with an error. With `val`, each epoch records the
    held-out perplexity and token accuracy. A module saved to `out` needs the MODEL `spec` it
    was built from; `meta` goes into the checkpoint. With `out` and `state_digest` (what
    identifies the run, `resume.run_digest`), the state after each epoch goes to `<out>.state`
    and a rerun of the same run continues after its last finished epoch (`softlabels.train.resume`).
    """
    if epochs <= 0 or lr <= 0:
        raise SoftlabelsError(f"epochs and lr must be positive, got {epochs} and {lr}")
    if out is not None and not isinstance(model, str) and spec is None:
        raise SoftlabelsError("a checkpoint rebuilds its model from a MODEL spec: pass the "
                              "model as a spec (e.g. python:package.module:factory) to save it")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    if isinstance(model, str):
        net, spec = load_model(model)
    else:
        net, spec = model, spec or f"object:{type(model).__qualname__}"
    net = net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    history: list[dict[str, Any]] = []
    step = start = 0
    keep = out is not None and state_digest is not None
    state = load_state(out, state_digest) if keep else None
    if state is not None:
        start = restore(state, net, opt, torch.Generator())
        history = list(state["history"])
        step = int(history[-1]["steps"]) if history else 0
        with warnings.catch_warnings():  # no optimizer step here: the restored state's
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):  # the learning rate where the run stopped
                sched.step()
        log.info("resuming %s after epoch %d of %d", out, start, epochs)
    for epoch in range(start, epochs):
        batches.set_epoch(epoch)
        loss_sum, positions = 0.0, 0
        for batch in batches:
            batch = batch.to(dev)
            loss = sequence_kd_loss(net(batch.tokens), batch, temperature=temperature,
                                    alpha=alpha, topk_loss=topk_loss)
            if not torch.isfinite(loss):
                raise SoftlabelsError(f"the loss became {loss.item()} at step {step} (epoch "
                                      f"{epoch}); lower --lr, or check the set with verify")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            sched.step()
            n = int(batch.mask.sum())
            loss_sum, positions, step = loss_sum + loss.item() * n, positions + n, step + 1
            for cb in callbacks:
                cb("batch", {"epoch": epoch, "step": step, "loss": loss.item(),
                             "batches": len(batches)})
        if not positions:
            raise DataError(NOTHING_TO_DISTIL)
        info = {"epoch": epoch + 1, "epochs": epochs, "loss": loss_sum / max(positions, 1),
                "positions": positions, "steps": step}
        if val is not None:
            held = evaluate_sequence_model(net, val, device=str(dev))
            info["val_perplexity"] = held["perplexity"]
            info["val_token_accuracy"] = held["token_accuracy"]
            net.train()
        history.append(info)
        if keep:
            save_state(out, digest=state_digest, epoch=epoch + 1, history=history, model=net,
                       optimizer=opt, generator=torch.Generator())
        log.info("epoch %d: loss %.4f over %d positions", epoch, info["loss"], positions)
        for cb in callbacks:
            cb("epoch", info)
    net.eval()
    if out is not None:
        save_checkpoint(net, out, spec=spec, meta={**(meta or {}), "history": history,
                                                   "alpha": alpha, "temperature": temperature,
                                                   "resumed_after_epoch": start})
        clear_state(out)
    return SequenceTrainResult(model=net, spec=spec, history=history,
                               positions=batches.num_positions,
                               seconds=time.perf_counter() - t0)


@torch.no_grad()
def evaluate_sequence_model(model: nn.Module, batches: Batches, *,
                            device: str = "auto") -> dict[str, float]:
    """Perplexity (exp of the mean next-token cross-entropy, nats) and token accuracy over the
    masked-in positions that have a hard target."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    nll, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = batch.to(dev)
        z = model(batch.tokens)
        keep = (batch.mask & (batch.labels >= 0)).reshape(-1)
        z, y = z.reshape(-1, z.shape[-1])[keep].float(), batch.labels.reshape(-1)[keep]
        nll += float(F.cross_entropy(z, y, reduction="sum"))
        correct += int((z.argmax(-1) == y).sum())
        count += len(y)
    if count == 0:
        raise SoftlabelsError("no position with a next token (hard target) that the mask "
                              "keeps: there is nothing to evaluate; pass sequences of 2 or "
                              "more tokens, or a mask that keeps some")
    ce = nll / count  # past ~709 nats exp overflows: a perplexity beyond any float is inf
    return {"perplexity": math.exp(ce) if ce < 709 else math.inf, "cross_entropy": ce,
            "token_accuracy": correct / count, "positions": count}


# --- `softlabels train` on token sequences ------------------------------------------------------

_NOT_FOR_SEQUENCES = (  # option, its default, flag, what to do instead
    ("classes", None, "--classes", "a sequence set is cut by whole sequences: use --fraction "
                                   "or --indices"),
    ("exclude_classes", None, "--exclude-classes", "a sequence set is cut by whole sequences: "
                                                   "use --fraction or --indices"),
    ("jitter_pixels", 0, "--jitter", "drop it (it shifts images)"),
    ("views_per_epoch", 1, "--views-per-epoch", "drop it (a sequence set holds no views)"),
    ("distributed", False, "--distributed", "drop it: sequence students train in one process"),
    ("optimizer", "adam", "--optimizer sgd", "drop it: sequence students train with AdamW"),
)


def train_sequence_student(data: str | Dataset, model: str, opts: TrainOptions, *,
                           out: str | os.PathLike[str] | None, transfer_set: Any,
                           indices: str | os.PathLike[str] | np.ndarray | None,
                           val_data: str | Dataset | None, stream: bool | None,
                           callbacks: Sequence[Callback], resume: bool = True) -> TrainResult:
    """`train_student` for token sequences (what it calls when the set is a sequence set or
    the data is token sequences): a model mapping (B, L) token ids to (B, L, C) logits, trained
    with `train_sequence_model` from the set's stored targets (or, without a set, from the
    hard next tokens). The set's targets are loaded when they fit (MAX_IN_MEMORY), else
    streamed (`StreamingSequenceBatches`); `stream` forces either. `--fraction`/`--indices`
    select whole sequences as `softlabels subset` does. With `out` and `resume`, a rerun of
    the same command after a kill continues after the last finished epoch (`<out>.state`)."""
    t0 = time.perf_counter()
    for name, default, flag, advice in _NOT_FOR_SEQUENCES:
        if getattr(opts, name) != default:
            raise OptionError(f"{flag} does not apply to token sequences; {advice}")
    own = transfer_set is not None and not isinstance(transfer_set, TransferSet)
    ts = open_transfer_set(transfer_set) if own else transfer_set
    try:
        dataset = load_data(data) if isinstance(data, str) else data
        if ts is not None and not is_sequence_set(ts):
            raise MismatchError(f"--data {data} is token sequences but {ts.path} is an example "
                                "set (one row per example); pass the DATA it was made from, or "
                                "a sequence set made from this data (precompute --data "
                                "tokens:...)")
        if not isinstance(dataset, TokenSequences):
            raise MismatchError(f"{ts.path} is a sequence set (one row per token of "
                                f"{ts.layout.num_sequences} sequences) but --data {data} is not "
                                "token sequences; pass the tokens:... DATA it was made from")
        name = data if isinstance(data, str) else type(data).__name__
        return _train_on(dataset, name, model, opts, ts, out=out, indices=indices,
                         val_data=val_data, stream=stream, callbacks=callbacks, t0=t0,
                         resume=resume)
    finally:
        if own and ts is not None:
            ts.close()


def _train_on(dataset: TokenSequences, name: str, model: str, opts: TrainOptions,
              ts: TransferSet | None,
              *, out: Any, indices: Any, val_data: Any, stream: bool | None,
              callbacks: Sequence[Callback], t0: float, resume: bool) -> TrainResult:
    offsets = dataset.offsets if ts is None else read_offsets(ts)
    index = np.arange(len(dataset)) if ts is None else ts.index()[offsets[:-1]]
    if isinstance(indices, (str, os.PathLike)):
        indices = read_indices(indices)
    chosen = select_sequences(_Index(index, offsets[:-1]), offsets, fraction=opts.fraction,
                              seed=opts.seed,
                              indices=None if indices is None else np.asarray(indices))
    if ts is not None:
        check_alignment(dataset, ts, offsets[:-1][chosen], seed=opts.seed)
        check_tokens(dataset, ts, offsets)
    torch.manual_seed(opts.seed)  # the student's initial weights, as train_sequence_model's
    net, spec = load_model(model, trust_code=opts.trust_code)
    probe = torch.cat([dataset[int(chosen[0])][:7], torch.tensor([int(dataset.tokens.max())])])
    if ts is not None:
        classes = check_sequence_student(net, probe, ts.num_classes,
                                         where=f"{ts.path} has {ts.num_classes} classes")
    else:  # hard next tokens: any vocabulary that holds the data's ids
        classes = check_sequence_student(net, probe, None, where="")
        check_student_vocabulary(dataset, classes)
    if stream is None:
        stream = ts is not None and target_bytes(ts) > MAX_IN_MEMORY
    common = dict(batch_size=opts.batch_size, sequences=chosen, seed=opts.seed)
    if ts is None:
        batches: Batches = SequenceBatches.from_tokens(dataset, **common)
    elif stream:
        batches = StreamingSequenceBatches(ts, temperature=opts.temperature, **common)
    else:
        batches = SequenceBatches(ts, temperature=opts.temperature, **common)
    if not stream:  # streamed: refused after a first epoch of no position
        check_masked_in(batches)
    val = None
    if val_data is not None:
        held = load_data(val_data) if isinstance(val_data, str) else val_data
        if not isinstance(held, TokenSequences):
            raise MismatchError(f"--val-data {val_data} is not token sequences; pass tokens:... "
                                "held-out text for a sequence student")
        val = SequenceBatches.from_tokens(held, batch_size=opts.batch_size, shuffle=False,
                                          num_classes=classes)
    temperature = (ts.temperatures[0] if opts.temperature is None else opts.temperature
                   ) if ts is not None else 1.0
    alpha = (0.9 if opts.alpha is None else opts.alpha) if ts is not None else 0.0
    meta = {"rows": batches.num_positions, "sequences": int(len(chosen)), "seed": opts.seed,
            "epochs": opts.epochs, "batch_size": opts.batch_size, "streamed": bool(stream),
            "data": name}
    if ts is not None:
        meta["transfer_set"] = {"path": str(ts.path), "temperature": temperature,
                                "alpha": alpha, "fingerprint": ts.meta["dataset"]["fingerprint"]}
    digest = run_digest({  # the epochs too: they shape the learning-rate schedule
        "data": name, "model": model, "transfer_set": None if ts is None else [
            str(ts.path), ts.meta.get("created_at"), ts.meta["dataset"]["fingerprint"]],
        "temperature": temperature, "alpha": alpha, "sequences": chosen.tolist(),
        "batch_size": opts.batch_size, "lr": opts.lr, "weight_decay": opts.weight_decay,
        "seed": opts.seed, "stream": bool(stream), "val": val_data is not None,
        "run": ("sequence", opts.epochs), "topk_loss": opts.topk_loss})
    result = train_sequence_model(net, batches, epochs=opts.epochs, lr=opts.lr,
                                  weight_decay=opts.weight_decay, temperature=temperature,
                                  alpha=alpha, topk_loss=opts.topk_loss, seed=opts.seed,
                                  device=opts.device, out=out,
                                  callbacks=callbacks, val=val, spec=spec, meta=meta,
                                  state_digest=digest if resume else None)
    return TrainResult(model=result.model.cpu(), spec=spec, history=result.history,
                       rows=result.positions, seconds=time.perf_counter() - t0)


class _Index:
    """The dataset index of each sequence (starting at row `starts`), read as
    `select_sequences` reads a set."""

    def __init__(self, index: np.ndarray, starts: np.ndarray) -> None:
        self.index, self._starts = index, starts

    def rows(self, names: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        return {S.INDEX: self.index[np.searchsorted(self._starts, rows)]}


def check_sequence_student(net: nn.Module, ids: torch.Tensor, classes: int | None, *,
                           where: str) -> int:
    """Refuse a student that does not map (B, L) token ids to (B, L, `classes`) logits (any C
    when `classes` is None); `ids` (L,): a probe holding the data's largest token id. Returns
    the student's C."""
    x = ids[None].long()
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            z = net(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MismatchError(f"the student cannot take (B, L) token ids (ids up to "
                            f"{int(ids.max())} here; {type(exc).__name__}: {first}); a sequence "
                            "set trains a model mapping (B, L) token ids "
                            f"to (B, L, C) logits: give --model such a model, or train an "
                            "example model from an example set") from None
    finally:
        net.train(was)
    shape = tuple(getattr(z, "shape", ()))
    if len(shape) != 3 or shape[:2] != tuple(x.shape):
        raise MismatchError(f"the student maps {tuple(x.shape)} token ids to {shape}, expected "
                            f"(B, L, C) logits, one row per token; give --model a sequence "
                            "model, or train this one from an example set")
    if classes is not None and shape[2] != classes:
        raise MismatchError(f"the student predicts {shape[2]} classes per token but {where}; "
                            f"give the model {classes} outputs")
    return int(shape[2])


NOTHING_TO_DISTIL = ("nothing to distil: every position of the chosen sequences is masked out "
                     "(mask 0 everywhere); choose sequences with positions to distil (mask 1), "
                     "e.g. conversations with assistant turns for mask=assistant")


def check_masked_in(batches: SequenceBatches) -> None:
    """Refuse a selection of sequences (in memory) whose mask is 0 at every position."""
    mask = np.concatenate([[0], np.cumsum(batches.columns["mask"], dtype=np.int64)])
    s = batches.sequences
    if not (mask[batches.offsets[s + 1]] - mask[batches.offsets[s]]).any():
        raise DataError(NOTHING_TO_DISTIL)


def check_student_vocabulary(data: TokenSequences, classes: int) -> None:
    """Refuse a student with fewer outputs than the data's next tokens (and labels) need; more
    (a vocabulary larger than the ids this data holds) is fine."""
    need = int(data.tokens.max()) + 1
    if data.labels is not None and not data.next_token_labels:
        need = max(need, int(data.labels.max()) + 1)
    if classes < need:
        raise MismatchError(f"the student predicts {classes} classes per token but the data "
                            f"reaches id {need - 1}; give the model at least {need} outputs "
                            "(its vocabulary)")

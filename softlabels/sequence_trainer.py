"""Stage two for sequences: train a sequence model (B, L) -> (B, L, V) from a sequence set's
stored targets (or from hard next tokens), and measure perplexity and token accuracy."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SoftlabelsError
from .sequence_datasets import SequenceBatches, sequence_kd_loss
from .specs import load_model, save_checkpoint
from .teacher import resolve_device
from .trainer import Callback

log = logging.getLogger(__name__)

@dataclass
class SequenceTrainResult:
    model: nn.Module
    spec: str
    history: list[dict[str, Any]] = field(default_factory=list)
    positions: int = 0
    seconds: float = 0.0


def train_sequence_model(
    model: str | nn.Module,
    batches: SequenceBatches,
    *,
    epochs: int = 1,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    temperature: float = 1.0,
    alpha: float = 0.9,
    clip: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    out: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> SequenceTrainResult:
    """Train `model` (a MODEL spec, or a module) on `batches` with `sequence_kd_loss`: AdamW,
    cosine learning-rate decay, gradients clipped to `clip`. The teacher is never loaded.
    The same seed gives the same model; a non-finite loss stops training with an error."""
    if epochs <= 0 or lr <= 0:
        raise SoftlabelsError(f"epochs and lr must be positive, got {epochs} and {lr}")
    if out is not None and not isinstance(model, str):
        raise SoftlabelsError("a checkpoint rebuilds its model from a MODEL spec: pass the "
                              "model as a spec (e.g. python:package.module:factory) to save it")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    if isinstance(model, str):
        net, spec = load_model(model)
    else:
        net, spec = model, f"object:{type(model).__qualname__}"
    net = net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        loss_sum, positions = 0.0, 0
        for batch in batches:
            batch = batch.to(dev)
            loss = sequence_kd_loss(net(batch.tokens), batch, temperature=temperature,
                                    alpha=alpha)
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
        info = {"epoch": epoch + 1, "epochs": epochs, "loss": loss_sum / max(positions, 1),
                "positions": positions}
        history.append(info)
        log.info("epoch %d: loss %.4f over %d positions", epoch, info["loss"], positions)
        for cb in callbacks:
            cb("epoch", info)
    net.eval()
    if out is not None:
        save_checkpoint(net, out, spec=spec, meta={"history": history, "alpha": alpha,
                                                   "temperature": temperature})
    return SequenceTrainResult(model=net, spec=spec, history=history,
                               positions=batches.num_positions,
                               seconds=time.perf_counter() - t0)


@torch.no_grad()
def evaluate_sequence_model(model: nn.Module, batches: SequenceBatches, *,
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
        raise SoftlabelsError("no position with a hard target to evaluate")
    return {"perplexity": math.exp(nll / count), "cross_entropy": nll / count,
            "token_accuracy": correct / count, "positions": count}

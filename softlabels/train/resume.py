"""Resume a killed training run: after every epoch the trainer writes its whole state (model,
optimizer, random generators, history) next to `--out`; rerunning the same command continues
from the last finished epoch instead of starting over.

The state file is `<out>.state`, written aside and renamed into place (a kill never leaves a
torn one), loaded with `weights_only=True` (it is data, never code), and removed once the
checkpoint is written. A state file from a run with other options is ignored (and replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softlabels.errors import MismatchError
from softlabels.safe_write import atomic_write
from softlabels.teachers.weights import unreadable_reason

log = logging.getLogger(__name__)

STATE_FORMAT = "softlabels-train-state"


@dataclass(frozen=True)
class Keep:
    """What a run keeps (`trainer.fit`): the checkpoint at `out`, carrying `meta`; and, given
    `digest` (`run_digest`: what identifies the run), its state at `<out>.state` after each
    epoch and every `state_every` steps (0: at epoch ends only), with the digests of the run's
    `inputs` (`input_proof.input_digests`), which a rerun of the same run resumes."""

    out: str | os.PathLike[str] | None = None
    digest: str | None = None
    inputs: dict[str, Any] | None = None
    state_every: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def states(self) -> bool:
        """Whether states are saved and resumed."""
        return self.out is not None and self.digest is not None


def state_path(out: str | os.PathLike[str]) -> Path:
    return Path(f"{out}.state")


def run_digest(options: dict[str, Any]) -> str:
    """SHA-256 of the options that shape training (JSON, sorted keys); epochs left out, so a
    rerun with more epochs continues the same run."""
    text = json.dumps({k: v for k, v in options.items() if k != "epochs"}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_state(out: str | os.PathLike[str], *, digest: str, epoch: int, history: list[Any],
               model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               generator: torch.Generator, stream: dict[str, int] | None = None,
               partial: tuple[float, int] | None = None,
               inputs: dict[str, Any] | None = None, step: int | None = None) -> None:
    """Write the state after `epoch` (count of finished epochs) atomically, with the digests of
    the run's `inputs` (`input_proof.input_digests`) that a resume must match. Mid-epoch (a
    streamed run): `stream` is the stream's `state_dict()` (epoch `epoch`, batches served) and
    `partial` the epoch's (summed loss, rows) so far. `step`: optimizer steps taken, where a
    learning-rate schedule resumes."""
    path = state_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": STATE_FORMAT, "digest": digest, "epoch": epoch, "history": history,
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
               "generator": generator.get_state(), "inputs": inputs,
               "step": step}
    if stream is not None:
        payload["stream"] = dict(stream)
        payload["partial"] = [float(partial[0]), int(partial[1])] if partial else [0.0, 0]
    with atomic_write(path, what="training state") as f:  # fsynced; never through a link
        torch.save(payload, f)


def load_state(out: str | os.PathLike[str], digest: str,
               inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The saved state of this run (same digest), or None to start from epoch 0. A state
    whose recorded `inputs` digests differ from `inputs` (a file replaced at the same path
    since) is refused: resuming would train one model on two inputs."""
    path = state_path(out)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged state file: start over rather than fail
        log.warning("ignoring unreadable training state %s (%s); starting from epoch 0", path,
                    unreadable_reason(exc))
        return None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        log.warning("ignoring %s: not a softlabels training state; starting from epoch 0", path)
        return None
    changed = _changed_inputs(payload.get("inputs"), inputs)
    if changed:
        raise MismatchError(
            f"{changed} changed since {path} was saved after epoch {payload.get('epoch')}: "
            "resuming would train one model on two inputs; restore the original, or remove "
            f"{path} to start over")
    if payload.get("digest") != digest:
        log.warning("ignoring %s: it comes from a run with other options; starting from epoch 0",
                    path)
        return None
    return payload


def mid_epoch(payload: dict[str, Any]) -> tuple[dict[str, int] | None, tuple[float, int]]:
    """(the stream's state, the epoch's (summed loss, rows) so far) of a state saved mid-epoch;
    (None, (0.0, 0)) for one saved at an epoch's end."""
    stream = payload.get("stream")
    if not isinstance(stream, dict) or int(stream.get("epoch", -1)) != int(payload["epoch"]):
        return None, (0.0, 0)
    total, seen = payload.get("partial", (0.0, 0))
    return {k: int(v) for k, v in stream.items()}, (float(total), int(seen))


def steps_taken(payload: dict[str, Any]) -> int:
    """Optimizer steps a saved run had taken (older states: the last epoch's record)."""
    if payload.get("step") is not None:
        return int(payload["step"])
    history = payload.get("history") or []
    return int(history[-1].get("steps", 0)) if history else 0


def _changed_inputs(recorded: Any, now: dict[str, Any] | None) -> str | None:
    """The first input (by name: 'data', 'indices', ...) whose digest differs, or None."""
    if not isinstance(recorded, dict) or now is None:
        return None  # a state from before input digests, or a caller that proves none
    for name, value in now.items():
        if name in recorded and recorded[name] != value:
            return "--data" if name == "data" else f"--{name}"
    return None


def restore(payload: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator) -> int:
    """Load a saved state into the run; returns the number of epochs already done."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    generator.set_state(payload["generator"])
    return int(payload["epoch"])


def clear_state(out: str | os.PathLike[str]) -> None:
    """Remove the state (and a temporary one a kill mid-write left behind)."""
    path = state_path(out)
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)

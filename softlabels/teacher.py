"""The teacher: one model or an ensemble, run in batches under inference mode."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import MismatchError, SoftlabelsError
from .specs import load_model, weights_sha256
from .tempering import combine_logits, ensemble_probs

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SoftlabelsError("--device cuda was asked for but no CUDA device is visible; "
                              "use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SoftlabelsError(f"unknown device {device!r}; use auto, cpu or cuda") from None


@dataclass
class Member:
    spec: str
    model: nn.Module
    sha256: str
    source: str  # what the user named: a checkpoint path, or the spec itself


class Teacher:
    """An ensemble of M >= 1 members that maps a batch to (M, B, C) logits."""

    def __init__(
        self,
        members: Sequence[str | nn.Module],
        *,
        device: str = "auto",
        precision: str = "fp32",
        combine: str = "mean-logits",
        seed: int = 0,
        trust_code: bool = False,
    ) -> None:
        if not members:
            raise SoftlabelsError("no teacher given; pass at least one --teacher MODEL")
        if precision not in PRECISIONS:
            raise SoftlabelsError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        self.precision, self.combine, self.trust_code = precision, combine, trust_code
        # Specs without weights (mlp:, torchvision:) initialise from `seed`, so a rerun of the
        # same command builds the same teacher and can resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.members = [self._member(m) for m in members]

    def _member(self, spec_or_model: str | nn.Module) -> Member:
        if isinstance(spec_or_model, nn.Module):
            model, spec = spec_or_model, f"object:{type(spec_or_model).__qualname__}"
        else:
            model, spec = load_model(spec_or_model, trust_code=self.trust_code)
        model = model.eval().to(self.device)
        return Member(spec=spec, model=model, sha256=weights_sha256(model),
                      source=spec_or_model if isinstance(spec_or_model, str) else spec)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C) float32 logits on the teacher's device."""
        x = x.to(self.device, non_blocking=True)
        with self._autocast():
            outs = [m.model(x) for m in self.members]
        sizes = {o.shape[-1] for o in outs}
        if len(sizes) > 1:
            found = ", ".join(f"{m.spec}: {o.shape[-1]}" for m, o in zip(self.members, outs))
            raise MismatchError(f"ensemble members disagree on the number of classes ({found}); "
                                "every --teacher must predict the same classes")
        return torch.stack([o.float() for o in outs])

    def num_classes(self, example: torch.Tensor) -> int:
        """The classes every member predicts, found by running the teacher once on one example;
        a member that cannot take the example's shape is named (before any expensive work)."""
        try:
            return int(self.member_logits(example.unsqueeze(0)).shape[-1])
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MismatchError(f"the teacher ({', '.join(m.source for m in self.members)}) "
                                f"cannot take the data's inputs shaped {tuple(example.shape)} "
                                f"({first}); give it a matching input size, or check --data"
                                ) from None

    @torch.inference_mode()
    def soft_targets(
        self, x: torch.Tensor, temperatures: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(member logits (M,B,C), combined logits (B,C), probs (K,B,C)), all float32."""
        z = self.member_logits(x)
        return z, combine_logits(z, self.combine), ensemble_probs(z, temperatures, self.combine)

    def weights_match(self, recorded: dict[str, Any]) -> tuple[bool, str]:
        """Whether these members' weights are those a set's `teacher` metadata records, and a
        sentence saying so."""
        same = [m.sha256 for m in self.members] == [m["sha256"] for m in recorded["members"]]
        return same, ("weights match the recorded SHA-256" if same else
                      "the live teacher's weights differ from the recorded ones")

    def describe(self) -> dict[str, object]:
        return {
            "members": [{"spec": m.spec, "sha256": m.sha256, "source": m.source}
                        for m in self.members],
            "combine": self.combine,
        }

"""The teacher: one model or an ensemble, run in batches under inference mode."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from softlabels.errors import MismatchError, OptionError, SoftlabelsError
from softlabels.format.info import TeacherInfo
from softlabels.preprocessing import Preprocess
from softlabels.teachers.models import load_built, weights_sha256
from softlabels.teachers.size import module_bytes, resolve_bound
from softlabels.teachers.weights import Built
from softlabels.tempering import combine_logits, ensemble_probs

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
    sha256: str  # over the state dict (weights_sha256): what resume and verify compare
    source: str  # what the user named: a checkpoint path, or the spec itself
    built: Built  # its weights files, own preprocessing, class names, whether untrained

    def to_meta(self) -> dict[str, Any]:
        """The member as a set's metadata records it (docs/FORMAT.md, teacher members)."""
        pre = self.built.preprocess
        return {"spec": self.spec, "sha256": self.sha256, "source": self.source,
                "weights_sha256": [f.to_meta() for f in self.built.files],
                "preprocess": pre.to_meta() if pre is not None else None,
                **({"weights_entry": self.built.entry} if self.built.entry else {}),
                **({"untrained": True} if self.built.untrained else {})}


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
        max_bytes: int | None = None,
    ) -> None:
        """`max_bytes`: the most the members' parameters and buffers may take together
        (default: the memory available now); each spec is measured on the meta device and
        refused before it is allocated."""
        if not members:
            raise SoftlabelsError("no teacher given; pass at least one --teacher MODEL")
        if precision not in PRECISIONS:
            raise SoftlabelsError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        self.precision, self.combine, self.trust_code = precision, combine, trust_code
        self._bytes_left = resolve_bound(max_bytes)  # what the next member may take
        # Specs without weights (mlp:, torchvision:) initialise from `seed`, so a rerun of the
        # same command builds the same teacher and can resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.members = [self._member(m) for m in members]

    def _member(self, spec_or_model: str | nn.Module) -> Member:
        if isinstance(spec_or_model, nn.Module):  # the caller holds it: accepted as trained
            built, spec = Built(spec_or_model), f"object:{type(spec_or_model).__qualname__}"
        else:
            built, spec = load_built(spec_or_model, trust_code=self.trust_code,
                                     max_bytes=self._bytes_left)
        if self._bytes_left is not None:
            self._bytes_left -= module_bytes(built.model)
        model = built.model.eval().to(self.device)
        return Member(spec=spec, model=model, sha256=weights_sha256(model),
                      source=spec_or_model if isinstance(spec_or_model, str) else spec,
                      built=built)

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
        if len(outs) == 1:  # a view, not a copy: one member is one pass less over (B, C)
            z = outs[0].float()
            if z is outs[0] and z.device.type == "cpu":  # the model's own tensor, on the host:
                z = z.clone()  # held past its next call (the writer thread), which may reuse it
            return z.unsqueeze(0)
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
        return self.targets_of(self.member_logits(x), temperatures)

    @torch.inference_mode()
    def targets_of(
        self, member_logits: torch.Tensor, temperatures: Sequence[float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`soft_targets` from member logits (M,B,C) already computed (`member_logits`)."""
        z = member_logits
        return z, combine_logits(z, self.combine), ensemble_probs(z, temperatures, self.combine)

    def weights_match(self, recorded: TeacherInfo) -> tuple[bool, str]:
        """Whether these members' weights are those a set's teacher (`TransferSet.info.teacher`)
        records, and a sentence saying so."""
        same = [m.sha256 for m in self.members] == [m.sha256 for m in recorded.members]
        return same, ("weights match the recorded SHA-256" if same else
                      "the live teacher's weights differ from the recorded ones")

    def refuse_untrained(self, allowed: bool) -> None:
        """Refuse members whose weights are only an initialisation (an architecture spec with
        no weights file), unless `allowed` (--random-teacher): their targets are noise."""
        bare = [m.source for m in self.members if m.built.untrained]
        if bare and not allowed:
            raise OptionError(
                f"the teacher {', '.join(bare)} has no trained weights (an architecture spec "
                "without a weights file: its targets would be noise); pass its weights, e.g. "
                "torchvision:NAME?weights=FILE.pth, timm:NAME?checkpoint=FILE, hf:DIR or a "
                "checkpoint from `softlabels train`; or pass --random-teacher "
                "(random_teacher=True) if a randomly initialised teacher is what you want")

    def preprocess(self) -> Preprocess | None:
        """The one preprocessing every member was trained with (None: none recorded);
        members that disagree are refused."""
        own = [m.built.preprocess for m in self.members]
        if any(p != own[0] for p in own):
            found = "; ".join(f"{m.source}: {p.to_meta() if p else 'none'}"
                              for m, p in zip(self.members, own))
            raise MismatchError(f"ensemble members expect different preprocessing ({found}); "
                                "run them as separate sets and merge them, or give each the "
                                "same resize=, crop=, mean=, std=, interpolation= in its spec")
        return own[0]

    def class_names(self) -> list[str]:
        """The class names the members' weights files name (the first that names any)."""
        return next((list(m.built.class_names) for m in self.members if m.built.class_names),
                    [])

    def describe(self, applied: Preprocess | None = None) -> dict[str, object]:
        """The teacher as a set's metadata records it; `applied`: the preprocessing the
        inputs went through on the way to the teacher (what `verify --teacher` replays)."""
        return {"members": [m.to_meta() for m in self.members], "combine": self.combine,
                **({"preprocess": applied.to_meta()} if applied is not None else {})}

"""Dense targets: every class's logit, and its probability at each stored temperature.

`logits` (R, C) in the set's dtype, `probs` (K, R, C) in its probs dtype and, where the members
were kept, `member_logits` (M, R, C). Served at any temperature: the stored probabilities at a
stored T, else re-tempered from the stored logits in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.format import schema as S
from softlabels.format.targets.base import TeacherOutputs, Uniforms, most_probable_first
from softlabels.tempering import tempered_softmax


@dataclass(frozen=True)
class Dense:
    """Dense targets; `members` > 0 also keeps that many members' logits."""

    members: int = 0
    name = "dense"
    sparse = False
    recomputable = True
    needs_uniforms = False

    def arrays(self, rows: int, temperatures: int, dtype: str, probs_dtype: str,
               num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {S.LOGITS: ((rows, num_classes), dtype),
               S.PROBS: ((temperatures, rows, num_classes), probs_dtype)}
        if self.members:
            out[S.MEMBER_LOGITS] = ((self.members, rows, num_classes), dtype)
        return out

    def chunk_width(self, num_classes: int, dtype: str) -> tuple[int, str]:
        return num_classes, dtype

    def to_meta(self) -> dict[str, Any] | None:
        return None

    def served(self, stored: bool) -> list[str]:
        return [S.PROBS if stored else S.LOGITS]

    def served_bytes(self, num_classes: int, itemsize: int) -> int:
        return num_classes * itemsize

    def encode(self, out: TeacherOutputs, temperatures: tuple[float, ...],
               uniforms: Uniforms | None) -> dict[str, torch.Tensor]:
        arrays = {S.LOGITS: out.logits, S.PROBS: out.probs()}
        if self.members:
            arrays[S.MEMBER_LOGITS] = out.members
        return arrays

    def decode(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               temperatures: tuple[float, ...], dtype: torch.dtype = torch.float32,
               ) -> list[torch.Tensor]:
        if k is not None:
            return [torch.from_numpy(arrays[S.PROBS]).to(dtype)]
        return [tempered_softmax(torch.from_numpy(arrays[S.LOGITS]), temperature).to(dtype)]

    def problems(self, arrays: dict[str, np.ndarray], num_classes: int,
                 temperatures: tuple[float, ...], dtype: str) -> str | None:
        return None  # probabilities and tempering: blockcheck and integrity.TemperingCheck

    def recipe(self) -> str | None:
        return None

    def live_differences(self, arrays: dict[str, np.ndarray], live: np.ndarray,
                         temperatures: tuple[float, ...], dtype: str) -> np.ndarray:
        live = live.astype(dtype).astype(np.float32)  # compared at the stored precision
        stored = arrays[S.LOGITS].astype(np.float32)
        return (np.abs(live - stored) / (1 + np.abs(stored))).max(1)

    def densify(self, classes: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
        raise ValueError("dense targets are dense already")

    def ranked(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               topk: int | None) -> dict[str, np.ndarray]:
        probs = self.decode(arrays, temperature, k, ()).pop().numpy()
        top = np.argpartition(-probs, topk - 1, axis=1)[:, :topk]
        p = np.take_along_axis(probs, top, 1)
        with np.errstate(divide="ignore"):
            lp, ids = most_probable_first(np.log(p), top.astype(np.int32))
        return {"ids": ids, "lp": lp, "valid": lp > -np.inf}

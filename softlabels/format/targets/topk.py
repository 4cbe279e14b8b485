"""Top-k targets: the k largest combined logits of each row, with the log-sum-exp of all C
logits at each stored temperature, so that the k probabilities are exact at a stored T.

`topk/indices` (R, k) int32, `topk/logits` (R, k), `topk/logsumexp` (R, K) float32. Example sets
store the logits as they are, largest first, in float32; sequence sets (`shifted`) store them
minus the row's largest logit, in ascending class order, in float32 or float16, and the
log-sum-exp shifted alike (logsumexp(z / T) - max(z) / T): docs/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.format import schema as S
from softlabels.format.targets.base import TeacherOutputs, Uniforms, most_probable_first
from softlabels.tempering import tempered

ARRAYS = [S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP]


@dataclass(frozen=True)
class TopK:
    """The k largest logits; `shifted` (sequence sets): shifted by the row maximum, in class
    order, stored in `dtype`."""

    k: int
    dtype: str = "float32"
    shifted: bool = False
    name = "topk"
    sparse = True
    recomputable = True
    needs_uniforms = False

    def arrays(self, rows: int, temperatures: int, dtype: str, probs_dtype: str,
               num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {S.TOPK_INDICES: ((rows, self.k), "int32"),
                S.TOPK_LOGITS: ((rows, self.k), self.dtype),
                S.TOPK_LOGSUMEXP: ((rows, temperatures), "float32")}

    def chunk_width(self, num_classes: int, dtype: str) -> tuple[int, str]:
        return 2 * self.k, "float32"

    def to_meta(self) -> dict[str, Any] | None:
        return {"kind": "topk", "k": self.k}

    def served(self, stored: bool) -> list[str]:
        return list(ARRAYS)

    def served_bytes(self, num_classes: int, itemsize: int) -> int:
        return self.k * (8 + itemsize)

    def encode(self, out: TeacherOutputs, temperatures: tuple[float, ...],
               uniforms: Uniforms | None) -> dict[str, torch.Tensor]:
        z = out.logits
        top = torch.topk(z, self.k, dim=-1)  # largest first (ties: torch.topk's order)
        lse = torch.stack([torch.logsumexp(tempered(z, t), -1) for t in temperatures], -1)
        if not self.shifted:
            return {S.TOPK_INDICES: top.indices.int(), S.TOPK_LOGITS: top.values,
                    S.TOPK_LOGSUMEXP: lse}
        shift = top.values[..., :1]  # the row's largest logit: the stored largest is 0
        # classes in ascending id order: sorted ids compress 3-10x better (sequence_storage.py)
        classes, order = top.indices.sort(-1)
        return {S.TOPK_INDICES: classes.int(),
                S.TOPK_LOGITS: (top.values - shift).gather(-1, order),
                S.TOPK_LOGSUMEXP: lse - shift / torch.tensor(temperatures, device=z.device)}

    def decode(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               temperatures: tuple[float, ...], dtype: torch.dtype = torch.float32,
               ) -> list[torch.Tensor]:
        z = torch.from_numpy(arrays[S.TOPK_LOGITS]).float()
        lse = torch.from_numpy(arrays[S.TOPK_LOGSUMEXP])[:, k:k + 1]
        return [torch.from_numpy(arrays[S.TOPK_INDICES]).long(),
                torch.exp(z / temperature - lse).to(dtype)]

    def problems(self, arrays: dict[str, np.ndarray], num_classes: int,
                 temperatures: tuple[float, ...], dtype: str) -> str | None:
        return None  # ids in range, per-T mass at most 1: blockcheck.target_problem

    def recipe(self) -> str | None:
        return None

    def live_differences(self, arrays: dict[str, np.ndarray], live: np.ndarray,
                         temperatures: tuple[float, ...], dtype: str) -> np.ndarray:
        classes = arrays[S.TOPK_INDICES].astype(np.int64)
        if not self.shifted:  # the stored logits, as they are
            want, got = np.take_along_axis(live, classes, axis=1), arrays[S.TOPK_LOGITS]
        else:  # both sides shifted by the row's largest logit, the normalisers compared too
            temps = np.array(temperatures, dtype=np.float32)
            top = live.max(1, keepdims=True)
            live_lse = np.stack([np.logaddexp.reduce(live / t, axis=1) for t in temps], 1) \
                - top / temps
            want = np.concatenate([np.take_along_axis(live, classes, 1) - top, live_lse], 1)
            got = np.concatenate([arrays[S.TOPK_LOGITS].astype(np.float32),
                                  arrays[S.TOPK_LOGSUMEXP]], 1)
        return (np.abs(want - got) / (1 + np.abs(got))).max(1)

    def densify(self, classes: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
        """The k exact probabilities, the residual mass spread evenly over the other classes."""
        rows, k = classes.shape
        dense = np.zeros((rows, num_classes), np.float32)
        dense += (1 - weights.sum(1, keepdims=True)).clip(0) / (num_classes - k)
        np.put_along_axis(dense, classes, weights, axis=1)
        return dense

    def ranked(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               topk: int | None) -> dict[str, np.ndarray]:
        z = arrays[S.TOPK_LOGITS].astype(np.float32)
        lp = z / np.float32(temperature) - arrays[S.TOPK_LOGSUMEXP][:, k:k + 1]
        lp, ids, logits = most_probable_first(lp, arrays[S.TOPK_INDICES], arrays[S.TOPK_LOGITS])
        return {"ids": ids, "lp": lp, "valid": np.ones(lp.shape, bool),
                "softlabels_topk_logits": logits,
                "softlabels_topk_logsumexp": arrays[S.TOPK_LOGSUMEXP]}

"""Sampled targets: k classes drawn with replacement from each row's p_T, at each stored T.

`sample/indices` (K, R, k) int32, sorted within a row; each draw weighs 1/k, an unbiased
estimate of p_T. The draws are by inverse CDF: with u (k,) uniforms of the row at T_j (seeded
by the kind of row: `base.Uniforms`), class = searchsorted(cumsum(p_T), u * cumsum(p_T)[-1],
right=True), clamped to C - 1, the CDF in float32: docs/FORMAT.md. `verify` does not redraw
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.format import schema as S
from softlabels.format.targets.base import TeacherOutputs, Uniforms, add_weights, sorted_counts


@dataclass(frozen=True)
class Sampled:
    """k classes drawn from p_T at each stored T."""

    k: int
    name = "sample"
    sparse = True
    recomputable = False
    needs_uniforms = True

    def arrays(self, rows: int, temperatures: int, dtype: str, probs_dtype: str,
               num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {S.SAMPLE_INDICES: ((temperatures, rows, self.k), "int32")}

    def chunk_width(self, num_classes: int, dtype: str) -> tuple[int, str]:
        return 2 * self.k, "float32"

    def to_meta(self) -> dict[str, Any] | None:
        return {"kind": "sample", "k": self.k}

    def served(self, stored: bool) -> list[str]:
        return [S.SAMPLE_INDICES]

    def served_bytes(self, num_classes: int, itemsize: int) -> int:
        return self.k * (8 + itemsize)

    def encode(self, out: TeacherOutputs, temperatures: tuple[float, ...],
               uniforms: Uniforms | None) -> dict[str, torch.Tensor]:
        u = uniforms((len(temperatures),), self.k).to(out.logits.device)  # (K, N, k)
        last = out.logits.shape[-1] - 1
        draws = []
        for j in range(len(temperatures)):  # one (N, C) CDF at a time
            cdf = out.probs_at(j).cumsum(-1)
            idx = torch.searchsorted(cdf, u[j] * cdf[..., -1:], right=True)
            draws.append(idx.clamp_max(last).sort(-1).values.int())
        return {S.SAMPLE_INDICES: torch.stack(draws)}

    def decode(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               temperatures: tuple[float, ...], dtype: torch.dtype = torch.float32,
               ) -> list[torch.Tensor]:
        idx = torch.from_numpy(arrays[S.SAMPLE_INDICES]).long()
        return [idx, torch.full(idx.shape, 1 / max(idx.shape[1], 1), dtype=dtype)]

    def problems(self, arrays: dict[str, np.ndarray], num_classes: int,
                 temperatures: tuple[float, ...], dtype: str) -> str | None:
        return None  # ids in range: blockcheck.target_problem

    def recipe(self) -> str | None:
        return None

    def live_differences(self, arrays: dict[str, np.ndarray], live: np.ndarray,
                         temperatures: tuple[float, ...], dtype: str) -> np.ndarray:
        raise ValueError("sampled classes are random draws: nothing to recompute")

    def densify(self, classes: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
        return add_weights(classes, weights, num_classes)  # the sampled frequencies

    def ranked(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               topk: int | None) -> dict[str, np.ndarray]:
        ids, counts = sorted_counts(arrays[S.SAMPLE_INDICES])  # (n, k) sorted within a row
        with np.errstate(divide="ignore"):
            lp = np.log(counts / counts.shape[1]).astype(np.float32)
        return {"ids": ids, "lp": lp, "valid": counts > 0}

"""The hybrid target codec: a nucleus head plus an importance-sampled tail, in one place.

How a hybrid target is laid out (`arrays`), written (`encode`, from a batch of combined teacher
logits on the teacher's device), read back into training targets (`decode`), checked without
the teacher (`problems`) and described in the metadata (`to_meta` / `from_meta`). `Layout`
holds one `Hybrid` when a set stores this kind; docs/FORMAT.md ("Hybrid sets") is the prose of
the same recipe, and docs/SPARSE.md says when to choose it.

Per row, with z the combined logits (C classes), T_0 the first stored temperature and
p_0 = softmax(z / T_0):

* **head**: the smallest set H of largest-logit classes whose p_0 mass reaches P (`nucleus`),
  at most k (`k`) of them; stored in ascending class order, then -1 in unused columns.
* **tail**: M (`tail`) classes drawn i.i.d. (with replacement) from the residual distribution
  r_0(i) = p_0(i) / R_0 for i outside H, R_0 = 1 - sum_{h in H} p_0(h); sorted ascending.
* **values**: z_i - max(z) of every stored class (head and tail), in the set's logits dtype,
  or as 8-bit codes c_i = round((max(z) - z_i) / s) with a per-row step s = max over the row's
  stored classes of (max(z) - z_i) / 255, dequantised as z_i - max(z) = -c_i * s.
* **log-sum-exp**: logsumexp(z / T_k) - max(z) / T_k at every stored T_k, exact (all C).

Training target at a stored T (`decode`): log p_T(i) = v_i / T - lse_T for every stored class;
head classes weigh p_T(h); tail draw m weighs  w_m = p_T(m) R_0 / (M p_0(m)).  For any f,
E[sum_m w_m f(m)] = sum_{i not in H} p_T(i) f(i): with f = log p_T - log q_T the estimate of
KL(p_T || q_T) is unbiased, and so is its gradient in the student logits, T (sum_j w_j q - w),
whose expectation is T (q - p_T). At T = T_0 every tail draw weighs R_0 / M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softlabels.errors import OptionError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.targets.base import TeacherOutputs, Uniforms, add_weights

QUANTIZE_CHOICES = (0, 8)  # 0: values in the logits dtype; 8: uint8 codes and a per-row step
PAD = -1  # the index of an unused head column (or of every tail column of a row whose
#           residual mass at T_0 is 0 in float32: nothing is left to draw)
LEVELS = 255  # the largest 8-bit code


@dataclass(frozen=True)
class Hybrid:
    """A hybrid target: head of at most `k` classes covering mass `nucleus` of p_{T_0}, plus
    `tail` draws from the rest; values quantised to `quantize` bits (0: not quantised)."""

    k: int
    nucleus: float
    tail: int
    quantize: int = 0
    name = "hybrid"
    sparse = True
    recomputable = True
    needs_uniforms = True

    def __post_init__(self) -> None:
        if not 0 < self.nucleus <= 1:
            raise TransferSetError(f"--nucleus must lie in (0, 1], got {self.nucleus}")
        if self.k < 1 or self.tail < 0:
            raise TransferSetError(f"a hybrid target needs --topk K >= 1 (the head's cap) and "
                                   f"--tail M >= 0, got K = {self.k}, M = {self.tail}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise TransferSetError(f"--quantize must be one of {QUANTIZE_CHOICES} (0: off), got "
                                   f"{self.quantize}")

    @property
    def width(self) -> int:
        """Columns of `hybrid/indices` and `hybrid/values`: k head, then M tail."""
        return self.k + self.tail

    # --- layout and metadata ----------------------------------------------------------------
    def arrays(self, rows: int, temperatures: int, dtype: str, probs_dtype: str,
               num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of the hybrid row arrays (every one has rows on axis 0);
        unquantised values in the set's logits `dtype`."""
        out = {S.HYBRID_INDICES: ((rows, self.width), "int32"),
               S.HYBRID_VALUES: ((rows, self.width), "uint8" if self.quantize else dtype),
               S.HYBRID_LOGSUMEXP: ((rows, temperatures), "float32")}
        if self.quantize:
            out[S.HYBRID_SCALE] = ((rows,), "float32")
        return out

    def chunk_width(self, num_classes: int, dtype: str) -> tuple[int, str]:
        return 2 * self.width, "float32"

    def served(self, stored: bool) -> list[str]:
        """The arrays `decode` reads."""
        return list(self.arrays(1, 1, "float32", "float32", 2))

    def served_bytes(self, num_classes: int, itemsize: int) -> int:
        return self.width * (8 + itemsize + 4)  # classes, weights, log p_T

    def densify(self, classes: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
        # the head exact, the tail draws' importance weights
        return add_weights(classes, weights, num_classes)

    def ranked(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               topk: int | None) -> dict[str, np.ndarray]:
        raise OptionError("a hybrid set's tail draws carry importance weights, which an "
                          "export's (ids, log-probabilities) columns cannot hold; export a "
                          "top-k or dense set")

    def to_meta(self) -> dict[str, Any]:
        return {"kind": "hybrid", "k": self.k, "nucleus": self.nucleus, "tail": self.tail,
                "quantize": self.quantize or None}

    @classmethod
    def from_meta(cls, sparse: dict[str, Any]) -> Hybrid:
        """From the `sparse` metadata object; raises ValueError on a malformed one."""
        nucleus = sparse["nucleus"]
        if isinstance(nucleus, bool) or not isinstance(nucleus, (int, float)):
            raise ValueError(f"hybrid nucleus must be a number, found {nucleus!r}")
        ints = [sparse["k"], sparse["tail"], sparse.get("quantize") or 0]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in ints):
            raise ValueError(f"hybrid k, tail and quantize must be integers, found {ints}")
        try:
            return cls(k=ints[0], nucleus=float(nucleus), tail=ints[1], quantize=ints[2])
        except TransferSetError as exc:
            raise ValueError(str(exc)) from None

    # --- writing ----------------------------------------------------------------------------
    def encode(self, out: TeacherOutputs, temperatures: tuple[float, ...],
               uniforms: Uniforms | None) -> dict[str, torch.Tensor]:
        """The hybrid arrays of N rows of combined logits (N, C), computed on their device;
        `uniforms((), M)` (N, M) in [0, 1) pick the tail draws (inverse CDF of r_0)."""
        z = out.logits.float()
        top = z.max(-1, keepdim=True).values
        lse = torch.stack([torch.logsumexp(z / t, -1) for t in temperatures], -1)
        lse = lse - top / torch.tensor(temperatures, device=z.device)
        head, in_head = self._head(z, temperatures[0])
        tail = self._tail(z, temperatures[0], in_head, uniforms((), self.tail).to(z.device))
        idx = torch.cat([head, tail], -1)  # (N, W), PAD where unused
        v = torch.where(idx >= 0, z.gather(-1, idx.clamp_min(0)) - top, 0.0)
        return {S.HYBRID_INDICES: idx.int(), S.HYBRID_LOGSUMEXP: lse.float()} | self._values(v)

    def _head(self, z: torch.Tensor, t0: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(head classes (N, k) ascending, PAD last; (N, C) bool mask of the head)."""
        n, c = z.shape
        k = min(self.k, c)
        top = torch.topk(z, k, dim=-1)  # largest first (ties: torch.topk's order)
        p0 = torch.softmax(z / t0, -1).gather(-1, top.indices)
        size = ((p0.cumsum(-1) < self.nucleus).sum(-1) + 1).clamp_max(k)  # smallest n >= P
        keep = torch.arange(k, device=z.device) < size[:, None]
        in_head = torch.zeros(n, c, dtype=torch.bool, device=z.device)
        in_head.scatter_(-1, top.indices, keep)
        classes = torch.where(keep, top.indices, c).sort(-1).values  # pads (c) sort last
        classes = torch.where(classes < c, classes, PAD)
        if k < self.k:  # fewer classes than columns
            classes = torch.cat([classes, torch.full((n, self.k - k), PAD, device=z.device)], -1)
        return classes, in_head

    def _tail(self, z: torch.Tensor, t0: float, in_head: torch.Tensor,
              u: torch.Tensor) -> torch.Tensor:
        """(N, M) classes drawn from r_0 by inverse CDF, ascending; PAD where R_0 is 0."""
        if not self.tail:
            return torch.empty(z.shape[0], 0, dtype=torch.int64, device=z.device)
        rest = torch.softmax(z / t0, -1).masked_fill(in_head, 0)
        cdf = rest.cumsum(-1)  # float32
        draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        # u * total can round up to the total: keep draws on the last class with mass
        positive = rest > 0
        last = z.shape[1] - 1 - positive.flip(-1).int().argmax(-1, keepdim=True)
        draws = torch.minimum(draws, last)
        draws = torch.where(positive.any(-1, keepdim=True), draws, PAD)
        return draws.sort(-1).values

    def _values(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored values of shifted logits v <= 0 (N, W): as they are, or 8-bit codes."""
        if not self.quantize:
            return {S.HYBRID_VALUES: v}  # cast to the set's dtype by the caller
        step = (-v).amax(-1) / LEVELS  # (N,) float32
        codes = torch.where(step[:, None] > 0, torch.round(-v / step[:, None].clamp_min(1e-30)),
                            0.0)
        return {S.HYBRID_VALUES: codes.clamp(0, LEVELS).to(torch.uint8), S.HYBRID_SCALE: step}

    # --- reading ----------------------------------------------------------------------------
    def shifted_logits(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(n, W) float32 stored values as logits minus the row maximum (dequantised)."""
        values = arrays[S.HYBRID_VALUES]
        if self.quantize:
            return -values.astype(np.float32) * arrays[S.HYBRID_SCALE].astype(np.float32)[:, None]
        return values.astype(np.float32)

    def decode(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               temperatures: tuple[float, ...], dtype: torch.dtype = torch.float32,
               ) -> list[torch.Tensor]:
        """[classes (n, W) int64, weights (n, W) in `dtype`, log p_T (n, W) float32] at the
        stored temperature `temperature` (index `k`). Unused columns: class 0, weight 0,
        log p 0 (they add nothing to the loss)."""
        classes, weights, log_p = self._decode(arrays, temperature, k, temperatures[0])
        return [torch.from_numpy(classes), torch.from_numpy(weights).to(dtype),
                torch.from_numpy(log_p)]

    def _decode(self, arrays: dict[str, np.ndarray], temperature: float, k: int,
                t0: float) -> list[np.ndarray]:
        idx = arrays[S.HYBRID_INDICES].astype(np.int64)
        lse = arrays[S.HYBRID_LOGSUMEXP].astype(np.float32)
        v = self.shifted_logits(arrays)
        used = idx >= 0
        head = np.arange(self.width) < self.k
        log_p = v / np.float32(temperature) - lse[:, k:k + 1]
        log_p0 = v / np.float32(t0) - lse[:, :1]
        with np.errstate(over="ignore"):
            r0 = np.clip(1 - np.where(used & head, np.exp(log_p0), 0).sum(1, keepdims=True),
                         0, None)
            tail_w = r0 / max(self.tail, 1) * np.exp(log_p - log_p0)
            w = np.where(head, np.exp(log_p), tail_w)
        return [np.where(used, idx, 0), np.where(used, w, 0).astype(np.float32),
                np.where(used, log_p, 0).astype(np.float32)]

    def live_differences(self, arrays: dict[str, np.ndarray], live: np.ndarray,
                         temperatures: tuple[float, ...], dtype: str) -> np.ndarray:
        """Per row, the largest |live - stored| / (1 + |stored|) over the stored values and
        log-sum-exps (both shifted by the row maximum), given the teacher's live logits
        (n, C); quantised values are compared to within half their step."""
        idx = arrays[S.HYBRID_INDICES].astype(np.int64)
        live = live.astype(np.float64)
        top = live.max(1, keepdims=True)
        want_v = np.take_along_axis(live, idx.clip(0), 1) - top
        t = np.asarray(temperatures, dtype=np.float64)
        want_lse = np.stack([np.logaddexp.reduce(live / x, axis=1) for x in t], 1) - top / t
        got_v = self.shifted_logits(arrays).astype(np.float64)
        half = arrays[S.HYBRID_SCALE][:, None] / 2 * (1 + 1e-6) if self.quantize else 0.0
        dv = np.where(idx >= 0, np.clip(np.abs(want_v - got_v) - half, 0, None), 0)
        dv = dv / (1 + np.abs(got_v))
        got_lse = arrays[S.HYBRID_LOGSUMEXP].astype(np.float64)
        dl = np.abs(want_lse - got_lse) / (1 + np.abs(got_lse))
        return np.maximum(dv.max(1), dl.max(1))

    # --- checking (verify, without the teacher) ----------------------------------------------
    def problems(self, arrays: dict[str, np.ndarray], num_classes: int,
                 temperatures: tuple[float, ...], dtype: str) -> str | None:
        """Why one block's hybrid targets break the recipe, or None: indices in range, the head
        ascending with its padding last and holding the row maximum (value 0), the tail
        ascending, outside the head and no larger than the head's smallest logit, the head's
        p_{T_0} mass at least P (unless full) and minimal, every log-sum-exp >= 0."""
        idx = arrays[S.HYBRID_INDICES].astype(np.int64)
        v = self.shifted_logits(arrays)
        lse = arrays[S.HYBRID_LOGSUMEXP]
        head, tail = idx[:, :self.k], idx[:, self.k:]
        hv = np.where(head >= 0, v[:, :self.k], np.inf)
        # rounding of the stored values: a few units of the dtype, or half an 8-bit step
        step = (arrays[S.HYBRID_SCALE][:, None] if self.quantize else
                np.float32(2.0 ** -10 if dtype == "float16" else 2.0 ** -22)
                * (1 + np.abs(v).max(1, keepdims=True)))
        checks = [
            ("an index outside [-1, C)", (idx < PAD) | (idx >= num_classes)),
            ("an empty head", head[:, :1] < 0),
            ("head classes not ascending, or padding before a class",
             ((head[:, 1:] >= 0) & ((head[:, :-1] < 0) | (head[:, 1:] <= head[:, :-1])))
             .any(1)),
            ("a head without the row's largest logit (value 0)",
             np.where(head >= 0, np.abs(v[:, :self.k]), np.inf).min(1) > step[:, 0]),
            ("tail draws not ascending", (np.diff(tail, axis=1) < 0).any(1)
             if self.tail > 1 else np.zeros(len(idx), bool)),
            ("a tail draw inside the head",
             ((tail[:, :, None] == head[:, None, :]) & (tail[:, :, None] >= 0)).any((1, 2))),
            ("a tail logit above the head's smallest",
             (np.where(tail >= 0, v[:, self.k:], -np.inf)
              > hv.min(1, keepdims=True) + 2 * step).any(1)),
            ("a negative log-sum-exp (below the row maximum / T)", (lse < -1e-6).any(1)),
        ]
        bad = [(what, np.flatnonzero(rows)) for what, rows in checks if np.any(rows)]
        if bad:
            what, rows = bad[0]
            return f"{what} at row {int(rows[0])} of the block"
        return self._mass_problem(head, v[:, :self.k], lse[:, 0], temperatures[0], step)

    def recipe(self) -> str | None:
        return (f"heads cover the nucleus {self.nucleus} minimally (at most {self.k} classes), "
                "ascending; tails outside the heads; log-sum-exps >= the row maxima")

    def _mass_problem(self, head: np.ndarray, v: np.ndarray, lse0: np.ndarray, t0: float,
                      step: np.ndarray) -> str | None:
        """The head's p_{T_0} mass reaches P (unless the head is full) and no smaller head of
        the largest classes does, within the value rounding."""
        p = np.where(head >= 0, np.exp(v / t0 - lse0[:, None]), 0)
        mass = p.sum(1)
        slack = mass * (np.expm1(step[:, 0] / t0) + 1e-5)  # each value within +-step
        full = (head >= 0).all(1)
        short = ~full & (mass + slack < self.nucleus)
        smallest = np.where(head >= 0, p, np.inf).min(1)
        excess = (head >= 0).sum(1) > 1
        loose = excess & (mass - smallest - slack >= self.nucleus)
        if short.any():
            r = int(np.argmax(short))
            return (f"a head of p_T0 mass {mass[r]:.6f} below the nucleus {self.nucleus} at row "
                    f"{r} of the block")
        if loose.any():
            r = int(np.argmax(loose))
            return (f"a head larger than needed for the nucleus {self.nucleus} (mass "
                    f"{mass[r]:.6f} without its smallest class) at row {r} of the block")
        return None

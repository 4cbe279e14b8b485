"""What every target kind is: the interface of a codec (`TargetKind`) and what codecs share.

A target kind says how a set stores each row's soft targets, and does everything that depends
on it, once: which arrays it stores (`arrays`), the metadata that names it (`to_meta`), how a
batch of the teacher's outputs becomes those arrays on the teacher's device (`encode`), how a
block's stored arrays become training targets at a temperature (`decode`; the loss reads them
by the kind's `name`, `train.losses.target_convention`), how `verify` checks them with
(`live_differences`) and without (`problems`) the teacher, and how `export` ranks them
(`ranked`). The writer, the readers of both stages, the losses, verify and export look the
codec up once, `Layout.target`, and never ask which kind a set is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from softlabels.errors import OptionError


@dataclass(frozen=True)
class TeacherOutputs:
    """What a codec encodes, for N rows, on the teacher's device: the combined logits (N, C),
    the ensemble's probabilities at every stored T (`probs()`, (K, N, C) float32, per its
    combine rule), the probabilities a sampler draws from at the j-th stored T (`probs_at(j)`,
    (N, C) float32), and the members' logits (M, N, C) where kept. Probabilities are computed
    only if a codec asks for them."""

    logits: torch.Tensor
    probs: Callable[[], torch.Tensor]
    probs_at: Callable[[int], torch.Tensor]
    members: torch.Tensor | None = None


# uniforms(leading, per_row) -> (*leading, N, per_row) float32 uniforms in [0, 1) for the N rows
# being encoded, drawn as the kind of row seeds them (examples: by the batch's first row;
# sequences: by each sequence's number), so any batching draws the same.
Uniforms = Callable[[tuple[int, ...], int], torch.Tensor]


@runtime_checkable
class TargetKind(Protocol):
    """A set's kind of soft target (dense, top-k, sampled, hybrid): one codec per kind."""

    name: str  # "dense", or the `sparse.kind` the metadata records
    sparse: bool  # stores no dense arrays: serves at its stored temperatures only
    recomputable: bool  # `verify --teacher` can recompute what it stores
    needs_uniforms: bool  # `encode` draws: the row kind seeds the uniforms

    def arrays(self, rows: int, temperatures: int, dtype: str, probs_dtype: str,
               num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of the target arrays of `rows` rows."""

    def chunk_width(self, num_classes: int, dtype: str) -> tuple[int, str]:
        """(values, dtype) of a row's widest stored target: what sizes a default chunk."""

    def to_meta(self) -> dict[str, Any] | None:
        """The `sparse` metadata object (None: dense)."""

    def served(self, stored: bool) -> list[str]:
        """The arrays `decode` reads at a temperature (`stored`: one the set stored)."""

    def served_bytes(self, num_classes: int, itemsize: int) -> int:
        """Bytes of one row's decoded targets in memory, weights of `itemsize` bytes."""

    def encode(self, out: TeacherOutputs, temperatures: tuple[float, ...],
               uniforms: Uniforms | None) -> dict[str, torch.Tensor]:
        """The stored arrays of N rows (the row axis as `arrays` places it), computed where
        the teacher ran; the caller casts each to its storage dtype (`Layout.arrays`)."""

    def decode(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               temperatures: tuple[float, ...], dtype: torch.dtype = torch.float32,
               ) -> list[torch.Tensor]:
        """A block's training targets at `temperature` (index `k` among the stored ones, or
        None), from the arrays `served` names as a block read at that temperature returns
        them: [probs (n, C)] dense; [classes (n, w) int64, weights (n, w)] sparse, and a
        hybrid's log p_T (n, w) float32 third. Probabilities and weights in `dtype`."""

    def problems(self, arrays: dict[str, np.ndarray], num_classes: int,
                 temperatures: tuple[float, ...], dtype: str) -> str | None:
        """Why one block's stored targets break this kind's recipe, beyond what every block
        is checked for (`blockcheck.target_problem`), or None."""

    def recipe(self) -> str | None:
        """What `problems` checks, in words, for verify's report; None: nothing of its own."""

    def live_differences(self, arrays: dict[str, np.ndarray], live: np.ndarray,
                         temperatures: tuple[float, ...], dtype: str) -> np.ndarray:
        """(n,) per row, the largest |live - stored| / (1 + |stored|) of what is stored, given
        the live teacher's logits (n, C) of those rows."""

    def densify(self, classes: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
        """Dense (n, C) float32 probabilities from decoded sparse targets (classes, weights)."""

    def ranked(self, arrays: dict[str, np.ndarray], temperature: float, k: int | None,
               topk: int | None) -> dict[str, np.ndarray]:
        """Export's view of a block's targets at `temperature`, most probable first (sampled:
        the distinct classes drawn, ascending, with their frequencies):
        {"ids" (n, w) int32, "lp" log-probabilities (n, w) float32, "valid" (n, w) bool}, and
        any kind-specific columns (named `softlabels_*`)."""


def refuse_unstored(where: str, target: TargetKind, temperature: float,
                    temperatures: tuple[float, ...], k: int | None) -> None:
    """Refuse, in one line, a sparse set asked for targets at a temperature it did not store
    (sparse targets cannot be re-tempered)."""
    if target.sparse and k is None:
        raise OptionError(f"{where} is sparse ({target.name}): its targets are exact at the "
                          f"stored temperatures {[float(t) for t in temperatures]} only, not "
                          f"{float(temperature)} (sparse targets cannot be re-tempered); pass "
                          "one of them")


def add_weights(classes: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, C) float32: each row's weights added up at their classes (a class drawn twice
    weighs twice)."""
    rows, k = classes.shape
    dense = np.zeros((rows, num_classes), np.float32)
    np.add.at(dense, (np.repeat(np.arange(rows), k), classes.ravel()), weights.ravel())
    return dense


def sorted_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct classes (n, w), their counts (n, w)) of sorted draws (n, w), left-aligned;
    unused slots hold class 0 and count 0."""
    n, w = draws.shape
    first = np.ones(draws.shape, bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = np.cumsum(first, 1) - 1
    rows = np.repeat(np.arange(n), w)
    counts = np.zeros((n, w), np.int64)
    np.add.at(counts, (rows, slot.ravel()), 1)
    ids = np.zeros((n, w), np.int32)
    ids[rows, slot.ravel()] = draws.ravel()
    return ids, counts


def most_probable_first(lp: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """Log-probabilities (n, w) and each of `columns` (n, w) reordered by descending
    probability (stable)."""
    order = np.argsort(-lp, axis=1, kind="stable")
    return [np.take_along_axis(a, order, 1) for a in (lp, *columns)]

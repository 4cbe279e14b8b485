"""Long sequences cut into windows: the `max_length=N&stride=M` options of the `tokens:` and
`text:` DATA specs (docs/TEXT.md, "Windows").

A sequence of n > N tokens becomes the windows starting at 0, N - M, 2 (N - M), ... (each N
tokens, the last one shorter), until a window reaches the sequence's end; a sequence of n <= N
tokens is kept whole. Consecutive windows share M tokens. Row p of a window (the teacher's
prediction of token p + 1) is distilled in exactly one window: the first M rows of every window
but the first are masked out (mask 0), since the window before computed those positions with
N - M more tokens of context. The other rows keep the sequence's own mask.

Hard targets stay the sequence's: the last row of a window is labelled with the token that
follows it in the sequence (not -1, as a window alone would say), so a windowed dataset carries
explicit labels (a set made from it records `labels: "data"`); as next-token labels, a next
token the teacher does not predict (id >= its classes) is no target (-1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softlabels.errors import SpecError
from softlabels.sources.tokens import Origin, TokenSequences


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def window_options(options: dict[str, Any], spec: str) -> tuple[int, int] | None:
    """(max_length, stride) from a DATA spec's options, checked; None without max_length."""
    length, stride = options.get("max_length"), options.get("stride")
    if length is None:
        if stride is not None:
            raise SpecError(f"stride={stride} without max_length in {spec!r}; windows need "
                            "both, e.g. max_length=1024&stride=128")
        return None
    if not _integer(length) or length < 2:
        raise SpecError(f"max_length must be an integer >= 2, got {length!r} in {spec!r}")
    stride = 0 if stride is None else stride
    if not _integer(stride) or not 0 <= stride < length:
        raise SpecError(f"stride must be an integer in [0, max_length) = [0, {length}), got "
                        f"{stride!r} in {spec!r}; it is the number of tokens consecutive "
                        "windows share")
    return int(length), int(stride)


def window_starts(n: int, length: int, stride: int) -> np.ndarray:
    """The first token of each window of a sequence of n tokens: 0, step, 2 step, ... while the
    window before ends before n (step = length - stride)."""
    if n <= length:
        return np.zeros(1, np.int64)
    step = length - stride
    count = 1 + -(-(n - length) // step)  # windows until one ends at or after n
    return np.arange(count, dtype=np.int64) * step


def windowed(data: TokenSequences, length: int, stride: int) -> TokenSequences:
    """`data` with every sequence longer than `length` cut into windows (module docstring);
    `data` itself when none is."""
    lengths = data.lengths
    if (lengths <= length).all():
        data.provenance = {**data.provenance, "windows": _record(length, stride, 0, len(data))}
        return data
    pieces: dict[str, list[np.ndarray]] = {"tokens": [], "mask": [], "labels": []}
    parents, spans = [], []
    for s, n in enumerate(lengths.tolist()):
        a0 = int(data.offsets[s])
        tokens = data.tokens[a0:a0 + n]
        mask = data.sequence_mask(s).astype(np.int64)
        labels = data.labels[a0:a0 + n] if data.labels is not None else \
            np.append(tokens[1:], -1)  # the next token of the sequence, not of the window
        starts = window_starts(n, length, stride)
        for w, a in enumerate(starts.tolist()):
            b = min(a + length, n)
            m = mask[a:b].copy()
            if w:
                m[:stride] = 0  # computed by the window before, with more context
            pieces["tokens"].append(tokens[a:b])
            pieces["mask"].append(m)
            pieces["labels"].append(labels[a:b])
            parents.append(s)
            spans.append((a, b) if len(starts) > 1 else (0, -1))
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in pieces["tokens"]])])
    origin = (data.origin or Origin.of_rows(data.where, np.arange(len(data)), "sequence"))
    out = TokenSequences.from_arrays(
        np.concatenate(pieces["tokens"]), offsets, mask=np.concatenate(pieces["mask"]),
        labels=np.concatenate(pieces["labels"]), where=data.where,
        origin=origin.take(np.array(parents), np.array(spans, dtype=np.int64)))
    out.next_token_labels = data.labels is None or data.next_token_labels
    cut = int((lengths > length).sum())
    out.provenance = {**data.provenance,
                      "windows": _record(length, stride, cut, len(data))}
    return out


def _record(length: int, stride: int, cut: int, sequences: int) -> dict[str, int]:
    """What a set's `dataset.windows` metadata records."""
    return {"max_length": length, "stride": stride, "sequences_cut": cut,
            "source_sequences": sequences}

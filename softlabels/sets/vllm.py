"""vLLM prompt log-probs (JSON lines) -> a verified top-k sequence set at T = 1.

One JSON object a line (docs/INTERCHANGE.md; other keys are ignored):

    {"prompt_token_ids": [t_0, ..., t_{L-1}],
     "prompt_logprobs": [null, {"<id>": LOGPROB | {"logprob": LOGPROB, "rank": R, ...}, ...},
                         ...],                      # L entries, the first null
     "mask": [0 | 1, ...]}                          # optional, L entries

`prompt_logprobs[j]` (j >= 1) is vLLM's answer for `prompt_logprobs=K`: the K most likely
tokens at position j given t_0..t_{j-1}, plus the prompt token t_j itself when it is not among
them (so K or K + 1 entries). Row j - 1 of the set (input token t_{j-1}) gets position j's K
classes: a sequence set's row p holds the distribution of the token after p. The last row has
no prompt log-probs: it is stored with placeholder targets and mask 0. The extra entry is
dropped exactly: vLLM adds t_j only when it is not among the top K, so with K + 1 entries t_j's
is dropped (its log-prob must not exceed any other's: it may tie with the Kth, and then shares
its rank); the K kept must have ranks 1..K where ranks are given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, OptionError
from softlabels.format.layout import Layout
from softlabels.progress import Progress
from softlabels.safe_read import input_lines
from softlabels.sets.imports import (
    SequenceRows,
    check_logprobs,
    check_vocab_size,
    first_pass,
    imported_meta,
    input_sha256,
    logprob_targets,
    next_token_labels,
    placeholder_targets,
    sequence_columns,
    sequence_hash,
    token_dataset,
    write_rows,
)
from softlabels.sources.tokens import MAX_TOKEN_ID

_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only ('٣' and '²' are digits to str.isdigit)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return obj


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    # read only; a link to a readable file is fine, a fifo or a device is not
    for n, raw in input_lines(path, "vLLM output"):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {n} is not UTF-8 (byte {exc.start}); JSON lines "
                            "are UTF-8 text") from None
        if line.strip():
            try:
                yield n, json.loads(line, object_pairs_hook=_no_duplicates)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n} is not JSON ({exc.msg}); write one "
                                "object a line (docs/INTERCHANGE.md)") from None
            except ValueError as exc:  # a key twice
                raise DataError(f"{path} line {n}: {exc}; which one is meant cannot be "
                                "told") from None


def _int(value: Any, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {what} must be an integer, found {value!r}")
    return value


def _entry(value: Any, where: str) -> tuple[float, int | None]:
    """(logprob, rank or None) of one dict entry: a number, or {"logprob", "rank", ...}."""
    if isinstance(value, dict):
        lp, rank = value.get("logprob"), value.get("rank")
        if rank is not None:
            rank = _int(rank, where, "a rank")
    else:
        lp, rank = value, None
    if isinstance(lp, bool) or not isinstance(lp, (int, float)):
        raise DataError(f"{where}: a log-prob must be a number, found {lp!r}")
    return float(lp), rank


def _position(entries: Any, token: int, k: int, where: str) -> tuple[list[int], list[float]]:
    """The K (id, logprob) of one position's dict, the extra prompt-token entry dropped."""
    if not isinstance(entries, dict):
        raise DataError(f"{where}: expected an object of token id -> log-prob, found "
                        f"{str(entries)[:40]!r}")
    if len(entries) not in (k, k + 1):
        raise DataError(f"{where}: {len(entries)} entries, expected {k} (the top {k}) or "
                        f"{k + 1} (plus the prompt token); pass the prompt_logprobs you asked "
                        "vLLM for as --topk")
    items = []
    for key, value in entries.items():
        if not (isinstance(key, str) and _ID.fullmatch(key)) or int(key) > MAX_TOKEN_ID:
            raise DataError(f"{where}: token id {key!r} is not an integer in "
                            f"[0, {MAX_TOKEN_ID}]")
        items.append((int(key), *_entry(value, where)))
    if token not in {i for i, _, _ in items}:
        raise DataError(f"{where}: the prompt token {token} is missing; vLLM lists it at every "
                        "position (is prompt_token_ids the prompt these log-probs are for?)")
    ranks = [r for _, _, r in items]
    if any(r is None for r in ranks) and any(r is not None for r in ranks):
        raise DataError(f"{where}: some entries have a rank and some not")
    keep = [(i, lp, r) for i, lp, r in items if len(items) == k or i != token]
    if len(items) == k + 1:  # vLLM added the prompt token: it is not among the top K
        extra = next(lp for i, lp, _ in items if i == token)
        if extra > min(lp for _, lp, _ in keep):
            raise DataError(f"{where}: {k + 1} entries, but the prompt token {token} is more "
                            f"likely than one of the other {k}; cannot tell the top {k}")
    if ranks[0] is not None and sorted(r for _, _, r in keep) != list(range(1, k + 1)):
        raise DataError(f"{where}: the top {k} have ranks {sorted(r for _, _, r in keep)}, "
                        f"expected 1..{k}")
    return [i for i, _, _ in keep], [lp for _, lp, _ in keep]


def parse_line(obj: Any, *, k: int, num_classes: int, dtype: str, where: str,
               ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(tokens (L,), target arrays of L rows, mask (L,)) of one line, checked."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with prompt_token_ids and "
                        "prompt_logprobs")
    ids, lps = obj.get("prompt_token_ids"), obj.get("prompt_logprobs")
    if not isinstance(ids, list) or not ids or not isinstance(lps, list):
        raise DataError(f"{where}: expected a non-empty list prompt_token_ids and a list "
                        "prompt_logprobs")
    tokens = np.array([_int(t, where, "a token id") for t in ids], dtype=np.int64)
    if tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID:
        raise DataError(f"{where}: prompt token ids must lie in [0, {MAX_TOKEN_ID}]")
    if len(lps) != len(tokens) or lps[0] is not None:
        raise DataError(f"{where}: prompt_logprobs must have one entry per prompt token "
                        f"({len(tokens)}), the first null; found {len(lps)} entries")
    n = len(tokens)
    rows = []  # the K entries are counted before an array of K columns is allocated
    for j in range(1, n):
        if lps[j] is None:
            raise DataError(f"{where}: position {j} has no log-probs (only position 0 may be "
                            "null)")
        rows.append(_position(lps[j], int(tokens[j]), k, f"{where}, position {j}"))
    classes = np.array([c for c, _ in rows], np.int64).reshape(n - 1, k)
    values = np.array([v for _, v in rows], np.float64).reshape(n - 1, k)
    check_logprobs(values, classes, num_classes, where)
    mask = np.ones(n, np.uint8)
    if obj.get("mask") is not None:
        m = obj["mask"]
        if not isinstance(m, list) or len(m) != n or any(v not in (0, 1) or isinstance(v, bool)
                                                         for v in m):
            raise DataError(f"{where}: mask must be a list of {n} zeros and ones")
        mask = np.array(m, np.uint8)
    mask[-1] = 0  # no prompt log-probs for the token after the last
    targets = logprob_targets(values, classes, dtype)
    last = placeholder_targets(1, k, dtype)
    return tokens, {name: np.concatenate([targets[name], last[name]]) for name in targets}, mask


def import_vllm(path: str | os.PathLike[str], out: str | os.PathLike[str], *, topk: int,
                vocab_size: int, teacher_name: str, dtype: str = "float32",
                chunk_rows: int = 0, overwrite: bool = False,
                progress: Progress | None = None) -> dict[str, Any]:
    """Import vLLM prompt log-probs (JSON lines, module docstring) into a top-k sequence set at
    T = 1 (`--topk K` as asked of vLLM, `--vocab-size V` of the teacher). Two passes: every
    line is checked before anything is written. Returns the set's metadata."""
    path = Path(path)
    check_vocab_size(vocab_size)
    if not 0 < topk < vocab_size:
        raise OptionError(f"--topk must lie in [1, {vocab_size - 1}] for a vocabulary of "
                          f"{vocab_size}, got {topk}")
    if not path.is_file():
        raise DataError(f"no such file {str(path)!r}; pass a JSON-lines file of vLLM prompt "
                        "log-probs")
    offsets, hashes = first_pass((parse_line(obj, k=topk, num_classes=vocab_size, dtype=dtype,
                                             where=f"{path} line {n}")[0]
                                  for n, obj in _lines(path)), f"{path} holds no lines")
    layout = Layout(num_rows=int(offsets[-1]), num_classes=vocab_size, temperatures=(1.0,),
                    topk=topk, num_sequences=len(hashes), topk_dtype=dtype,
                    chunk_rows=chunk_rows)
    meta = imported_meta(
        teacher_name=teacher_name,
        dataset=token_dataset(f"tokens:{path}?field=prompt_token_ids", hashes),
        targets={"source": "logprobs", "exact_temperatures": [1.0]},
        provenance={"format": "vllm-prompt-logprobs", "path": str(path), "topk": topk},
        sha256=input_sha256([path]))

    def rows() -> Iterator[dict[str, np.ndarray]]:  # pass 2
        for s, (n, obj) in enumerate(_lines(path)):
            tokens, targets, mask = parse_line(obj, k=topk, num_classes=vocab_size,
                                               dtype=dtype, where=f"{path} line {n}")
            if s >= len(hashes) or sequence_hash(tokens) != int(hashes[s]):
                raise DataError(f"{path} line {n} changed between the two passes; do not edit "
                                "the input while it is imported")
            yield sequence_columns(tokens, s, mask, next_token_labels(tokens, vocab_size),
                                   targets)

    return write_rows(out, layout, meta, SequenceRows(offsets, rows()), overwrite=overwrite,
                      progress=progress)


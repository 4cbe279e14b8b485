"""Stage one's one block loop over its kinds of row (compute/rows.py, compute/blocks.py): the
table covers every kind a set records, and token sequences now take the same loop as examples,
writer thread included, writing what the inline path writes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import CHUNK
from softlabels.compute.blocks import KINDS, precompute
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.layout import ROW_KINDS
from softlabels.format.reader import open_transfer_set
from softlabels.format.writer import TransferSetWriter
from softlabels.sources.tokens import data_kind

TEACHER = "python:helpers:tiny_lm"


def write_tokens(path: Path, n: int = 29) -> str:
    """n sequences of 1..40 tokens: several windows of 16 blocks at 8 rows per block."""
    rng = np.random.default_rng(1)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps(rng.integers(0, 11, int(rng.integers(1, 41))).tolist()) + "\n")
    return f"tokens:{path}"


def arrays(path: Path) -> dict[str, np.ndarray]:
    with open_transfer_set(path) as ts:
        assert ts.meta["status"] == "complete"
        return {name: ts.read(name) for name in ts.store.names()}


def test_the_table_has_one_strategy_per_kind_of_row(tmp_path: Path, npz_data: str) -> None:
    assert sorted(KINDS) == sorted(ROW_KINDS)
    assert data_kind(npz_data) == "examples" and data_kind(f"tokens:{tmp_path}/t") == "sequences"
    for kind in KINDS.values():
        for step in ("prepare", "open_writer", "units", "batches", "targets", "assembler"):
            assert callable(getattr(kind, step)), step


@pytest.mark.parametrize("extra", [{"topk": 3}, {"sample_k": 2}, {"dtype": "float32"}],
                         ids=["topk", "sampled", "dense"])
def test_sequences_on_the_writer_thread_write_what_the_inline_path_writes(
        tmp_path: Path, extra: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_tokens(tmp_path / "t.jsonl")
    writers: list[str] = []
    write_block = TransferSetWriter.write_block

    def recorded(self, block, arrays):  # noqa: ANN001, ANN202
        writers.append(threading.current_thread().name)
        write_block(self, block, arrays)

    monkeypatch.setattr(TransferSetWriter, "write_block", recorded)
    sets, seen = {}, []
    for flag in ("0", "1"):
        monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", flag)
        sets[flag] = tmp_path / f"s{flag}.zarr"
        seen.append([])
        result = precompute(data, [TEACHER], sets[flag], temperatures=[1, 2], chunk_rows=8,
                            batch_size=3, random_teacher=True,
                            progress=lambda done, total, s=seen[-1]: s.append((done, total)),
                            **extra)
        assert result.num_rows > 2 * 16 * 8  # more than two windows
    assert set(writers[:len(writers) // 2]) == {"MainThread"}
    assert set(writers[len(writers) // 2:]) == {"softlabels-writer"}
    inline, threaded = arrays(sets["0"]), arrays(sets["1"])
    assert inline.keys() == threaded.keys()
    for name in inline:
        np.testing.assert_array_equal(threaded[name], inline[name], err_msg=name)
    for calls in seen:  # progress rises batch by batch to every position
        done = [d for d, _ in calls]
        assert done == sorted(done) and done[-1] == calls[-1][1] == result.num_rows
        assert len(calls) > result.num_rows // (16 * 8) + 2


def test_a_failure_in_a_window_leaves_earlier_windows_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop stops at the first failed batch; windows already finished stay done, and a
    rerun computes the rest into the set an uninterrupted run writes."""
    data = write_tokens(tmp_path / "t.jsonl")
    out, fresh = tmp_path / "s.zarr", tmp_path / "fresh.zarr"
    kind, batches = KINDS["sequences"], KINDS["sequences"].batches
    calls = [0]

    def failing(*args):  # noqa: ANN002, ANN202
        for batch in batches(*args):
            calls[0] += 1
            if calls[0] == 12:
                raise OSError("the data went away")
            yield batch

    monkeypatch.setattr(kind, "batches", failing)
    with pytest.raises(OSError, match="went away"):
        precompute(data, [TEACHER], out, topk=3, chunk_rows=CHUNK // 2, batch_size=2,
                   random_teacher=True)
    with open_store(out, "r") as store:
        done = store.read(S.BLOCK_DONE)
        assert 0 < int(done.sum()) < len(done)
    monkeypatch.setattr(kind, "batches", batches)
    precompute(data, [TEACHER], out, topk=3, chunk_rows=CHUNK // 2, batch_size=2,
               random_teacher=True)
    precompute(data, [TEACHER], fresh, topk=3, chunk_rows=CHUNK // 2, batch_size=2,
               random_teacher=True)
    resumed, want = arrays(out), arrays(fresh)
    for name in want:
        np.testing.assert_array_equal(resumed[name], want[name], err_msg=name)

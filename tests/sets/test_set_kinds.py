"""The set tools are written once: verify, import and export pick what differs between kinds of
row (examples, positions of sequences) from one table each, keyed by `Layout.kind`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from token_data import TEACHER, write_tokens

from conftest import CHUNK, make_npz
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError, TransferSetError
from softlabels.format.layout import ROW_KINDS, Layout
from softlabels.sets import alignment, export, imports
from softlabels.sets.export import export_set
from softlabels.sets.imports import ExampleRows, SequenceRows, write_rows
from softlabels.sets.verify import verify


def test_every_kind_of_row_has_one_strategy_in_each_table() -> None:
    for table in (alignment.KINDS, imports.KINDS, export.KINDS):
        assert sorted(table) == sorted(ROW_KINDS)


def test_rows_of_another_kind_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    layout = Layout(num_rows=5, num_classes=3, temperatures=(1.0,), topk=2, num_sequences=2)
    rows = ExampleRows(lambda b: {}, lambda a, b: np.zeros(b - a, np.uint64))
    with pytest.raises(TransferSetError, match="layout is of sequences, the rows given are of "
                                               "examples"):
        write_rows(tmp_path / "s.zarr", layout, {}, rows)
    layout = Layout(num_rows=5, num_classes=3, temperatures=(1.0,))
    with pytest.raises(TransferSetError, match="layout is of examples"):
        write_rows(tmp_path / "s.zarr", layout, {}, SequenceRows(np.array([0, 5]), []))
    assert not list(tmp_path.iterdir())


def test_rows_that_cannot_be_located_in_the_data_are_not_recomputed(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "e.zarr"
    precompute(data, ["mlp:16-3"], out, chunk_rows=CHUNK, random_teacher=True)
    short = make_npz(tmp_path / "short.npz", n=50)  # row 60 names an example it lacks
    checks = {c.name: c for c in verify(out, data=short, teachers=["mlp:16-3"]).checks}
    assert not checks["data"].ok and "the dataset has 50 examples" in checks["data"].detail
    assert "teacher" not in checks
    edited = make_npz(tmp_path / "edited.npz", seed=1)  # every row there, none the same
    checks = {c.name: c for c in verify(out, data=edited, teachers=["mlp:16-3"]).checks}
    assert not checks["data"].ok and "103 of 103 rows" in checks["data"].detail
    assert "64 sampled rows recomputed" in checks["teacher"].detail


def test_positions_of_other_tokens_are_not_recomputed(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "t.jsonl")
    out = tmp_path / "s.zarr"
    precompute(tokens, [TEACHER], out, chunk_rows=16, random_teacher=True)
    other = write_tokens(tmp_path / "o.jsonl", seed=5)  # 23 sequences of other lengths
    checks = {c.name: c for c in verify(out, data=other, teachers=[TEACHER]).checks}
    assert not checks["data"].ok and "sequences differ from the data" in checks["data"].detail
    assert "teacher" not in checks
    assert verify(out, data=tokens, teachers=[TEACHER]).ok


def test_an_example_set_is_not_exported(tmp_path: Path) -> None:
    out = tmp_path / "e.zarr"
    precompute(make_npz(tmp_path / "d.npz"), ["mlp:16-3"], out, random_teacher=True)
    with pytest.raises(SoftlabelsError, match="is an example set .* export writes sequence "
                                              "sets"):
        export_set(out, tmp_path / "x")
    assert not (tmp_path / "x").exists()

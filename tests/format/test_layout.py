"""The one definition of the format: a layout and its metadata, both directions, for every kind
of set; metadata that describes no valid layout is refused in one line."""

from __future__ import annotations

from typing import Any

import pytest

from softlabels.errors import TransferSetError
from softlabels.format import schema as S
from softlabels.format.layout import LAYOUT_KEYS, Layout

BASE = dict(num_rows=103, num_classes=5, temperatures=(1.0, 4.0), chunk_rows=16)
KINDS: dict[str, dict[str, Any]] = {
    "dense": {}, "float32": {"dtype": "float32", "probs_dtype": "float16"},
    "ensemble": {"num_members": 3}, "topk": {"topk": 2}, "sample": {"sample_k": 4},
    "views": {"views": 3}, "inputs": {"input_shape": (1, 4, 4)},
    "sharded": {"shard_rows": 48}, "everything": {"num_members": 2, "views": 2,
                                                   "input_shape": (2,), "shard_rows": 32},
}
EXPECTED = {  # arrays besides labels, index, sample_hash, block_done, array_checksum
    "dense": {S.LOGITS, S.PROBS}, "float32": {S.LOGITS, S.PROBS},
    "ensemble": {S.LOGITS, S.PROBS, S.MEMBER_LOGITS},
    "topk": {S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP}, "sample": {S.SAMPLE_INDICES},
    "views": {S.LOGITS, S.PROBS, S.VIEW_SEED}, "inputs": {S.LOGITS, S.PROBS, S.INPUTS},
    "sharded": {S.LOGITS, S.PROBS},
    "everything": {S.LOGITS, S.PROBS, S.MEMBER_LOGITS, S.VIEW_SEED, S.INPUTS},
}


def with_teacher(meta: dict[str, Any], members: int) -> dict[str, Any]:
    return {**meta, "teacher": {"members": [{"sha256": str(m)} for m in range(members)]}}


@pytest.mark.parametrize("kind", KINDS)
def test_layout_to_meta_and_back_for_every_kind(kind: str) -> None:
    layout = Layout(**BASE, **KINDS[kind])
    meta = layout.to_meta()
    assert tuple(meta) == LAYOUT_KEYS
    assert Layout.from_meta(with_teacher(meta, max(layout.num_members, 1))) == layout
    specs = layout.specs()
    always = {S.LABELS, S.INDEX, S.SAMPLE_HASH, S.BLOCK_DONE, S.ARRAY_CHECKSUM}
    assert set(specs) == always | EXPECTED[kind]
    for name, a in specs.items():
        assert len(a.dims) == len(a.shape) == len(a.chunks), name
        if name in always - {S.BLOCK_DONE, S.ARRAY_CHECKSUM} or name in EXPECTED[kind]:
            assert a.shape[S.row_axis(name)] == 103 and a.dims[S.row_axis(name)] == S.ROWS
            assert (a.shards or a.chunks)[S.row_axis(name)] == layout.block_rows \
                or name == S.INPUTS
        elif name == S.BLOCK_DONE:
            assert a.shape == (layout.num_blocks,) and a.dims == (S.BLOCKS,)
    # one checksum per block and row array, per temperature or member where rows are axis 1
    slots = layout.checksum_slots()
    assert specs[S.ARRAY_CHECKSUM].shape == (layout.num_blocks, len(slots))
    assert specs[S.ARRAY_CHECKSUM].chunks == (1, len(slots))  # one writer per block
    assert specs[S.ARRAY_CHECKSUM].dims == (S.BLOCKS, S.SLOTS)
    assert [name for name, _ in slots] == sorted(
        n for n, (shape, _) in layout.arrays().items()
        for _ in range(shape[0] if S.row_axis(n) == 1 else 1))


def test_a_sparse_set_keeps_no_member_logits() -> None:
    layout = Layout(**BASE, topk=2, num_members=3)
    assert S.MEMBER_LOGITS not in layout.specs() and layout.to_meta()["keep_members"] is False


@pytest.mark.parametrize("change,found", [
    ({"num_rows": "103"}, "'103'"), ({"num_rows": True}, "True"),
    ({"temperatures": []}, "temperatures"), ({"temperatures": [4, 4]}, "temperatures"),
    ({"temperatures": [1, -2]}, "temperatures"), ({"dtype": "int8"}, "int8"),
    ({"sparse": {"kind": "magic", "k": 2}}, "magic"), ({"block_rows": 7}, "block_rows"),
    ({"chunk_rows": 0}, "0"), ({"shard_rows": 24}, "shard rows 24"),
    ({"sparse": {"kind": "topk", "k": 9}}, "--topk"), ({"num_classes": None}, "None"),
    ({"inputs": {"shape": [4], "dtype": "object"}}, "object"),
    ({"sparse": {"kind": "sample", "k": 0}}, "found 0"),
    ({"inputs": {"shape": [4], "dtype": "nonsense"}}, "nonsense"),
    ({"inputs": {"shape": [-4], "dtype": "float32"}}, "-4"),
])
def test_metadata_that_describes_no_layout_is_refused_in_one_line(change: dict[str, Any],
                                                                   found: str) -> None:
    meta = {**Layout(**BASE).to_meta(), **change}
    with pytest.raises(TransferSetError, match="describes no valid layout") as err:
        Layout.from_meta(with_teacher(meta, 1), where="x.zarr")
    assert found in str(err.value) and "\n" not in str(err.value)


def test_missing_keys_are_named() -> None:
    meta = Layout(**BASE).to_meta()
    del meta["chunk_rows"]
    with pytest.raises(TransferSetError, match="missing key 'chunk_rows'"):
        Layout.from_meta(meta)

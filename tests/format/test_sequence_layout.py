"""Sequence sets inside the one layout definition (format/layout.py): their arrays, dimension
names and metadata come from `Layout`, the reader refuses arrays the metadata does not imply,
the digest covers the `sequence` metadata, and top-k logits are byte-shuffled on both backends.
Also the built-in `gpt:` MODEL spec of the tiny_lm job."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from token_data import TEACHER, write_tokens

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError, SpecError, TransferSetError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.layout import IDENTITY_KEYS, LAYOUT_KEYS, Layout
from softlabels.format.reader import open_transfer_set
from softlabels.teachers.models import build_model, load_checkpoint, save_checkpoint

SEQ_ROW_ARRAYS = (S.SEQ_POSITION, S.SEQ_TOKENS, S.SEQ_MASK)


def seq_layout(**changes: object) -> Layout:
    args = {"num_rows": 37, "num_classes": 11, "temperatures": (1.0, 2.0), "topk": 3,
            "chunk_rows": 8, "num_sequences": 5, "topk_dtype": "float16",
            "offsets_xxh3": "0123456789abcdef", **changes}
    return Layout(**args)


def test_layout_specs_and_metadata_of_a_sequence_set() -> None:
    lay = seq_layout()
    specs = lay.specs()
    for name in SEQ_ROW_ARRAYS:
        assert specs[name].shape == (37,) and specs[name].dims == (S.ROWS,)
    assert specs[S.SEQ_OFFSETS].shape == (6,) and specs[S.SEQ_OFFSETS].dtype == "int64"
    assert specs[S.SEQ_OFFSETS].dims == (S.BOUNDS,) and S.SEQ_OFFSETS not in lay.arrays()
    assert specs[S.TOPK_LOGITS].dtype == "float16" and specs[S.TOPK_LOGITS].shuffle_compress
    assert not any(a.shuffle_compress for n, a in specs.items() if n != S.TOPK_LOGITS)
    meta = lay.to_meta()
    assert meta["sequence"] == {"num_sequences": 5, "topk_dtype": "float16",
                                "topk_shifted": True, "topk_order": "class",
                                "labels": "next-token", "offsets_xxh3": "0123456789abcdef"}
    assert Layout.from_meta(meta) == lay
    assert "sequence" in LAYOUT_KEYS and "sequence" in IDENTITY_KEYS
    plain = Layout(num_rows=37, num_classes=11, temperatures=(1.0,), topk=3)
    assert plain.to_meta()["sequence"] is None
    assert not set(plain.specs()) & {S.SEQ_OFFSETS, *SEQ_ROW_ARRAYS}
    assert not plain.specs()[S.TOPK_LOGITS].shuffle_compress


@pytest.mark.parametrize("changes, match", [
    ({"num_sequences": 0}, "float16 top-k logits are stored only in sequence sets"),
    ({"num_sequences": 38}, "1..37 sequences"),
    ({"views": 2}, "not views"),
    ({"sequence_labels": "other"}, "sequence labels"),
])
def test_layouts_that_describe_no_sequence_set_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(TransferSetError, match=match):
        seq_layout(**changes)


def test_metadata_of_another_top_k_order_is_refused() -> None:
    meta = {**seq_layout().to_meta(), "teacher": {"members": []}}
    meta["sequence"] = {**meta["sequence"], "topk_order": "largest-first"}
    with pytest.raises(TransferSetError, match="class order"):
        Layout.from_meta(meta)


def _remove(path: Path, name: str) -> None:
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            del f[name]
    else:
        shutil.rmtree(path / name)


def test_reader_refuses_missing_and_extra_sequence_arrays(tmp_path: Path, out_path: Path,
                                                          npz_data: str) -> None:
    precompute(write_tokens(tmp_path / "t.jsonl"), [TEACHER], out_path, chunk_rows=CHUNK,
               topk=3, temperatures=[1, 2], random_teacher=True)
    for name in (S.SEQ_MASK, S.SEQ_OFFSETS):
        damaged = out_path.with_name(f"{name.replace('/', '_')}{out_path.suffix}")
        (shutil.copytree if out_path.is_dir() else shutil.copy)(out_path, damaged)
        _remove(damaged, name)
        with pytest.raises(TransferSetError, match=f"{name}: expected .* found nothing"):
            open_transfer_set(damaged)
    example = tmp_path / f"example{out_path.suffix}"
    precompute(npz_data, ["mlp:16-3"], example, random_teacher=True)
    with open_store(example, "r+") as store:
        store.create(S.SEQ_TOKENS, (10,), "int32", chunks=(10,))
    with pytest.raises(TransferSetError, match="seq/tokens: not implied by the metadata"):
        open_transfer_set(example)


def test_digest_covers_the_sequence_metadata(tmp_path: Path, out_path: Path) -> None:
    precompute(write_tokens(tmp_path / "t.jsonl"), [TEACHER], out_path, chunk_rows=CHUNK,
               topk=3, random_teacher=True)
    with open_store(out_path, "r+") as store:
        meta = store.get_meta()
        meta["sequence"] = {**meta["sequence"], "labels": "data"}  # a consistent layout
        store.set_meta(meta)
    with pytest.raises(SoftlabelsError, match="edited metadata: sequence"):
        open_transfer_set(out_path)


def test_top_k_logits_are_byte_shuffled_on_both_backends(tmp_path: Path, out_path: Path) -> None:
    precompute(write_tokens(tmp_path / "t.jsonl"), [TEACHER], out_path, chunk_rows=CHUNK,
               topk=3, dtype="float16", random_teacher=True)
    if out_path.suffix == ".h5":
        with h5py.File(out_path, "r") as f:
            assert f[S.TOPK_LOGITS].shuffle and f[S.TOPK_LOGITS].compression == "gzip"
            assert not f[S.TOPK_LOGSUMEXP].shuffle
            assert [d.label for d in f[S.SEQ_OFFSETS].dims] == [S.BOUNDS]
    else:
        g = zarr.open_group(out_path, mode="r")
        (codec,) = g[S.TOPK_LOGITS].compressors
        assert type(codec).__name__ == "BloscCodec" and codec.shuffle.value == "shuffle"
        assert g[S.TOPK_LOGSUMEXP].compressors == ()
        assert g[S.SEQ_OFFSETS].metadata.dimension_names == (S.BOUNDS,)
    with open_transfer_set(out_path) as ts:
        assert ts.read(S.TOPK_LOGITS).dtype == np.float16
        assert (ts.read(S.TOPK_LOGITS).max(1) == 0).all()  # shifted by the row's largest


def test_gpt_spec_builds_a_causal_model_and_its_checkpoint_needs_no_trust(
        tmp_path: Path) -> None:
    spec = "gpt:11?dim=8&layers=1&heads=2&context=16"
    model = build_model(spec)
    ids = torch.randint(0, 11, (2, 9))
    z = model(ids)
    assert z.shape == (2, 9, 11)
    ids2 = ids.clone()
    ids2[:, 5:] = (ids2[:, 5:] + 1) % 11  # later tokens never change earlier outputs
    torch.testing.assert_close(model(ids2)[:, :5], z[:, :5])
    save_checkpoint(model, tmp_path / "m.pt", spec=spec)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")  # a built-in spec: no --trust-code
    torch.testing.assert_close(loaded(ids), z)
    for bad in ("gpt:x?dim=8", "gpt:11?dim=8&heads=3", "gpt:11?width=8", "gpt:11?dim=0"):
        with pytest.raises(SpecError):
            build_model(bad)

"""Sequence sets: one row per position of variable-length token sequences (format/sequence.py),
stage one over token DATA, verify, convert, subset by sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import TEACHER, VOCAB, write_tokens

from conftest import CHUNK
from helpers import TinyLM
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import DataError, IntegrityError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.operations import convert, merge, subset
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import (
    SEQ_MASK,
    SEQ_POSITION,
    SEQ_TOKENS,
    read_offsets,
)
from softlabels.sets.verify import verify
from softlabels.sources.token_files import load_tokens


@pytest.fixture
def tokens(tmp_path: Path) -> str:
    return write_tokens(tmp_path / "t.jsonl")


def dense_logits(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return TinyLM(VOCAB)(torch.tensor([ids]))[0]


def test_rows_are_positions_with_offsets_tokens_and_next_token_labels(
        tmp_path: Path, tokens: str, out_path: Path) -> None:
    precompute(tokens, [TEACHER], out_path, temperatures=[1, 2], chunk_rows=CHUNK, batch_size=4,
               dtype="float32", random_teacher=True)
    data = load_tokens(str(tmp_path / "t.jsonl"), {}, tokens)
    with open_transfer_set(out_path) as ts:
        offsets = read_offsets(ts)
        np.testing.assert_array_equal(offsets, data.offsets)
        assert ts.num_rows == offsets[-1] == 195 and ts.num_rows % CHUNK
        np.testing.assert_array_equal(ts.read(SEQ_TOKENS), data.tokens)
        for s in (0, 7, 22):
            a, b = offsets[s], offsets[s + 1]
            ids = data.tokens[a:b].tolist()
            np.testing.assert_array_equal(ts.read(SEQ_POSITION, a, b), np.arange(b - a))
            np.testing.assert_array_equal(ts.index()[a:b], s)
            np.testing.assert_array_equal(ts.labels()[a:b], ids[1:] + [-1])
            np.testing.assert_allclose(ts.logits(a, b), dense_logits(ids), rtol=1e-5,
                                       atol=1e-6)  # batched with padding = run alone
            np.testing.assert_allclose(ts.probs(2.0, a, b),
                                       torch.softmax(dense_logits(ids) / 2, -1), rtol=1e-5)
        assert ts.read(SEQ_MASK).all()


def test_topk_probabilities_exact_at_every_t_in_float16(tmp_path: Path, tokens: str,
                                                        suffix: str) -> None:
    precompute(tokens, [TEACHER], tmp_path / "d.zarr", temperatures=[1, 4], chunk_rows=CHUNK,
               dtype="float32", random_teacher=True)
    precompute(tokens, [TEACHER], tmp_path / f"k.{suffix}", temperatures=[1, 4],
               chunk_rows=CHUNK, topk=4, dtype="float16", random_teacher=True)
    with open_transfer_set(tmp_path / "d.zarr") as d, \
            open_transfer_set(tmp_path / f"k.{suffix}") as k:
        assert k.arrays()[S.TOPK_LOGITS][1] == "float16"
        assert (k.read(S.TOPK_LOGITS).max(1) == 0).all()  # shifted by the row's largest logit
        assert (np.diff(k.read(S.TOPK_INDICES), axis=1) > 0).all()  # in class order
        for t in (1.0, 4.0):
            classes, weights = k.sparse_targets(t)
            dense = d.probs(t)
            np.testing.assert_array_equal(classes,
                                          np.sort(np.argsort(-dense, 1, kind="stable")[:, :4]))
            np.testing.assert_allclose(weights, np.take_along_axis(dense, classes, 1),
                                       rtol=2e-3)  # float16 logits in [-x, 0]


def test_sampled_draws_do_not_depend_on_batching(tmp_path: Path, tokens: str) -> None:
    for name, batch in (("a", 3), ("b", 16)):
        precompute(tokens, [TEACHER], tmp_path / f"{name}.zarr", temperatures=[2],
                   chunk_rows=CHUNK, sample_k=5, batch_size=batch, random_teacher=True)
    with open_transfer_set(tmp_path / "a.zarr") as a, open_transfer_set(tmp_path / "b.zarr") as b:
        np.testing.assert_array_equal(a.read(S.SAMPLE_INDICES), b.read(S.SAMPLE_INDICES))
        assert a.read(S.SAMPLE_INDICES).max() < VOCAB
    precompute(tokens, [TEACHER], tmp_path / "many.zarr", temperatures=[2], chunk_rows=CHUNK,
               sample_k=4000, random_teacher=True)
    precompute(tokens, [TEACHER], tmp_path / "dense.zarr", temperatures=[2], chunk_rows=CHUNK,
               dtype="float32", random_teacher=True)
    with open_transfer_set(tmp_path / "many.zarr") as m, \
            open_transfer_set(tmp_path / "dense.zarr") as d:  # frequencies follow p_T
        np.testing.assert_allclose(m.probs(2.0, 0, 60), d.probs(2.0, 0, 60), atol=0.035)


def test_masks_and_object_rows_from_jsonl(tmp_path: Path) -> None:
    spec = write_tokens(tmp_path / "m.jsonl", masks=True) + "?field=input_ids&mask=loss_mask"
    precompute(spec, [TEACHER], tmp_path / "m.zarr", chunk_rows=CHUNK, topk=2, random_teacher=True)
    with open_transfer_set(tmp_path / "m.zarr") as ts:
        np.testing.assert_array_equal(ts.read(SEQ_MASK), ts.read(SEQ_POSITION) >= 2)


@pytest.mark.parametrize("rows, match", [(["[1, 2]", "[]"], "empty one"),
                                         (["[1, -2]"], "outside"),
                                         (["[1, 2]", "{\"x\": [1]}"], "expected a list"),
                                         (["[1, 2", ""], "not JSON")])
def test_bad_token_files_are_refused(tmp_path: Path, rows: list[str], match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=match):
        load_tokens(str(path), {}, f"tokens:{path}")


def test_parquet_tokens(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="Parquet token data needs pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"tokens": [[1, 2, 3], [4], [5, 6]]}), tmp_path / "t.parquet")
    data = load_tokens(str(tmp_path / "t.parquet"), {}, "tokens:t.parquet")
    np.testing.assert_array_equal(data.offsets, [0, 3, 4, 6])


def test_saved_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="DATA tokens:DIR needs `datasets`")
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]],
                                "loss_mask": [[0, 1, 1], [1], [0, 1]]}).save_to_disk(
        str(tmp_path / "ds"))
    spec = f"tokens:{tmp_path / 'ds'}?mask=loss_mask"
    data = load_tokens(str(tmp_path / "ds"), {"mask": "loss_mask"}, spec)
    np.testing.assert_array_equal(data.tokens, [1, 2, 3, 4, 5, 6])
    precompute(spec, [TEACHER], tmp_path / "s.zarr", topk=2, random_teacher=True)
    with open_transfer_set(tmp_path / "s.zarr") as ts:
        np.testing.assert_array_equal(ts.read(SEQ_MASK), [0, 1, 1, 1, 0, 1])


def test_subset_by_sequence_keeps_whole_sequences(tmp_path: Path, tokens: str,
                                                  out_path: Path) -> None:
    precompute(tokens, [TEACHER], tmp_path / "src.zarr", chunk_rows=CHUNK, topk=3,
               random_teacher=True)
    (tmp_path / "keep.txt").write_text("3\n5\n20\n")
    subset(tmp_path / "src.zarr", out_path, indices=tmp_path / "keep.txt")
    with open_transfer_set(tmp_path / "src.zarr") as src, open_transfer_set(out_path) as sub:
        so, bo = read_offsets(src), read_offsets(sub)
        assert len(bo) == 4 and sub.meta["provenance"]["subset_of"]["sequences"] == 3
        for k, s in enumerate((3, 5, 20)):
            for name in (S.TOPK_INDICES, S.TOPK_LOGITS, SEQ_TOKENS, S.LABELS, S.INDEX):
                np.testing.assert_array_equal(sub.read(name, bo[k], bo[k + 1]),
                                              src.read(name, so[s], so[s + 1]))
    assert verify(out_path, data=tokens, teachers=[TEACHER]).ok
    subset(tmp_path / "src.zarr", tmp_path / "f.zarr", fraction=0.3, seed=1)
    with open_transfer_set(tmp_path / "f.zarr") as f:
        assert f.meta["sequence"]["num_sequences"] == 7
    with pytest.raises(SoftlabelsError, match="cut by whole sequences"):
        subset(tmp_path / "src.zarr", tmp_path / "c.zarr", classes=[1])
    with pytest.raises(SoftlabelsError, match="merging sequence sets is not defined"):
        merge([tmp_path / "src.zarr", tmp_path / "f.zarr"], tmp_path / "m.zarr")


@pytest.mark.parametrize("target", ["c.h5", "c.zarr.zip", "c.zarr"])
def test_convert_is_content_identical(tmp_path: Path, tokens: str, target: str) -> None:
    src = tmp_path / ("s.zarr" if target != "c.zarr" else "s.h5")
    precompute(tokens, [TEACHER], src, chunk_rows=CHUNK, topk=3, temperatures=[1, 3],
               random_teacher=True)
    convert(src, tmp_path / target)
    with open_transfer_set(src) as a, open_transfer_set(tmp_path / target) as b:
        assert a.row_arrays() == b.row_arrays()
        for name in a.row_arrays():
            np.testing.assert_array_equal(a.read(name), b.read(name))
        np.testing.assert_array_equal(read_offsets(a), read_offsets(b))
    assert verify(tmp_path / target, data=tokens, teachers=[TEACHER]).ok


def test_verify_names_damage_and_other_teachers(tmp_path: Path, tokens: str) -> None:
    out = tmp_path / "s.zarr"
    precompute(tokens, [TEACHER], out, chunk_rows=CHUNK, topk=3, random_teacher=True)
    report = verify(out, data=tokens, teachers=[TEACHER])
    assert report.ok, report.to_dict()
    other = verify(out, data=tokens, teachers=[TEACHER + "?seed=4"])
    assert not other.ok and "differ" in {c.name: c.detail for c in other.checks}[
        "teacher weights"]
    wrong = write_tokens(tmp_path / "w.jsonl", seed=5)
    assert not {c.name: c.ok for c in verify(out, data=wrong).checks}["data"]
    with open_store(out, "r+") as store:  # one stored token changed: its block no longer matches
        store.write(SEQ_TOKENS, slice(40, 41), np.array([(int(store.read(SEQ_TOKENS)[40]) + 1)
                                                         % VOCAB], np.int32))
    checks = {c.name: c for c in verify(out).checks}
    assert not checks["checksums"].ok and "block 2 " in checks["checksums"].detail
    with open_transfer_set(out) as ts, pytest.raises(IntegrityError, match="block 2 "):
        ts.read_block(2)
    with open_store(out, "r+") as store:  # boundaries moved: the recorded hash catches it
        offsets = store.read(S.SEQ_OFFSETS)
        offsets[3] += 1
        store.write(S.SEQ_OFFSETS, slice(None), offsets)
    checks = {c.name: c for c in verify(out).checks}
    assert not checks["sequences"].ok and "hash" in checks["sequences"].detail


def test_rerun_resumes_and_refuses_other_sequences(tmp_path: Path, tokens: str) -> None:
    out = tmp_path / "s.zarr"
    args = dict(chunk_rows=CHUNK, topk=3, temperatures=[1, 2])
    precompute(tokens, [TEACHER], out, **args, random_teacher=True)
    with open_transfer_set(out) as ts:
        ref = {n: ts.read(n) for n in ts.row_arrays()}
    with open_store(out, "r+") as store:  # as if killed: two blocks undone, status writing
        meta = store.get_meta()
        store.set_meta({**meta, "status": "writing"})
        store.write(S.BLOCK_DONE, slice(3, 5), np.zeros(2, np.uint8))
    result = precompute(tokens, [TEACHER], out, **args, random_teacher=True)
    assert result.resumed and result.rows_computed == 2 * CHUNK
    with open_transfer_set(out) as ts:
        for name, data in ref.items():
            np.testing.assert_array_equal(ts.read(name), data)
    with pytest.raises(SoftlabelsError, match="different run|other sequences"):
        precompute(write_tokens(tmp_path / "o.jsonl", seed=9), [TEACHER], out, **args,
                   random_teacher=True)


def test_cli_precompute_refuses_options_that_do_not_apply(tmp_path: Path, tokens: str) -> None:
    result = CliRunner().invoke(cli, ["precompute", "--data", tokens, "--teacher", TEACHER,
                                      "--out", str(tmp_path / "s.zarr"), "--keep-members",
                                      "--random-teacher"])
    assert result.exit_code == 1 and "keep-members does not apply" in result.output
    result = CliRunner().invoke(cli, ["precompute", "--data", tokens, "--teacher",
                                      "python:helpers:four_classes",
                                      "--out", str(tmp_path / "s.zarr"), "--random-teacher"])
    assert result.exit_code == 1 and "(B, L, C)" in result.output
    assert not (tmp_path / "s.zarr").exists()

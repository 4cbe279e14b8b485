"""Stage one: what precompute writes, how it resumes, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHUNK, N_ROWS, make_npz
from softlabels.compute.blocks import precompute
from softlabels.errors import MismatchError, SoftlabelsError, SpecError, TeacherOutputError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sources.load import load_data
from softlabels.teachers.models import load_model

TEACHERS = ["mlp:16-8-3", "mlp:16-6-3", "mlp:16-5-3"]


def reference(data: str, teachers: list[str]) -> torch.Tensor:
    """(M, N, C) member logits computed independently of the writer (same seeded init)."""
    torch.manual_seed(0)
    models = [load_model(t)[0].eval() for t in teachers]
    x = load_data(data).x
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


@pytest.mark.slow
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 70), members=st.integers(1, 3), chunk=st.integers(1, 32),
       batch=st.integers(1, 40), combine=st.sampled_from(["mean-logits", "mean-probs"]),
       suffix=st.sampled_from(["zarr", "h5"]))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, n: int, members: int, chunk: int,
                    batch: int, combine: str, suffix: str) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    data = make_npz(tmp / "d.npz", n=n)
    teachers = TEACHERS[:members]
    out = tmp / f"s.{suffix}"
    precompute(data, teachers, out, temperatures=[1, 4], chunk_rows=chunk, batch_size=batch,
               combine=combine, dtype="float32", keep_members=True, random_teacher=True)
    z = reference(data, teachers)
    with open_transfer_set(out) as ts:
        assert ts.num_rows == n and ts.num_classes == 3
        np.testing.assert_allclose(ts.read(S.MEMBER_LOGITS), z.numpy(), rtol=1e-5, atol=1e-6)
        for t in (1.0, 4.0):
            member_p = torch.softmax(z / t, dim=-1)
            want = (member_p.mean(0) if combine == "mean-probs"
                    else torch.softmax(z.mean(0) / t, dim=-1))
            np.testing.assert_allclose(ts.probs(t), want.numpy(), rtol=1e-5, atol=1e-6)
        assert ts.index().tolist() == list(range(n))
        assert ts.labels().tolist() == np.load(tmp / "d.npz")["y"].tolist()
        assert ts.meta["dataset"]["fingerprint"] == S.fingerprint(ts.sample_hash())


def test_defaults_dtypes_and_metadata(npz_data: str, out_path: Path) -> None:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 2.5, 20], chunk_rows=CHUNK,
               random_teacher=True)
    with open_transfer_set(out_path) as ts:
        arrays = ts.arrays()
        assert arrays[S.LOGITS][:2] == ((N_ROWS, 3), "float16")
        assert arrays[S.PROBS][:2] == ((3, N_ROWS, 3), "float32")
        assert arrays[S.LOGITS][2] == (CHUNK, 3)  # rows only, never split classes
        assert S.MEMBER_LOGITS not in arrays
        meta = ts.meta
        assert meta["status"] == "complete" and meta["format_version"] == 2
        assert len(meta["teacher"]["members"][0]["sha256"]) == 64
        assert meta["dataset"]["length"] == N_ROWS and meta["versions"]["zarr"]
        # T not stored: re-tempered from logits in float32
        z = torch.from_numpy(ts.logits())
        np.testing.assert_allclose(ts.probs(7.0), torch.softmax(z / 7, -1).numpy(), rtol=1e-6)


def test_default_chunk_is_near_one_mib() -> None:
    assert S.default_chunk_rows(10, "float16") == 32768
    assert S.default_chunk_rows(1000, "float16") == 512


def test_rerun_resumes_only_missing_blocks(npz_data: str, out_path: Path,
                                           tmp_path: Path) -> None:
    args = dict(temperatures=[1, 4], chunk_rows=CHUNK, batch_size=10)
    full = tmp_path / f"full{out_path.suffix}"
    precompute(npz_data, ["mlp:16-8-3"], full, **args, random_teacher=True)
    precompute(npz_data, ["mlp:16-8-3"], out_path, **args, random_teacher=True)
    # Simulate an interruption: un-mark two blocks and set the status back to writing.
    from softlabels.format.backends import open_store

    with open_store(out_path, "r+") as store:
        done = store.read(S.BLOCK_DONE)
        done[[1, 4]] = 0
        store.write(S.BLOCK_DONE, slice(None), done)
        meta = store.get_meta()
        store.set_meta({**meta, "status": "writing"})
        store.erase_block(S.LOGITS, 1, CHUNK, 0)
    result = precompute(npz_data, ["mlp:16-8-3"], out_path, **args, random_teacher=True)
    assert result.resumed and result.rows_computed == 2 * CHUNK
    with open_transfer_set(out_path) as a, open_transfer_set(full) as b:
        for name in (S.LOGITS, S.PROBS, S.LABELS, S.INDEX, S.SAMPLE_HASH):
            np.testing.assert_array_equal(a.read(name), b.read(name))
    again = precompute(npz_data, ["mlp:16-8-3"], out_path, **args, random_teacher=True)
    assert again.already_complete and again.rows_computed == 0


def test_changed_teacher_or_data_is_refused_and_set_untouched(
        npz_data: str, out_path: Path, tmp_path: Path) -> None:
    precompute(npz_data, ["mlp:16-8-3"], out_path, chunk_rows=CHUNK, random_teacher=True)
    with open_transfer_set(out_path) as ts:
        before = ts.logits()
    with pytest.raises(MismatchError, match="teacher weights"):
        precompute(npz_data, ["mlp:16-9-3"], out_path, chunk_rows=CHUNK, random_teacher=True)
    other = make_npz(tmp_path / "other.npz", seed=5)
    with pytest.raises(MismatchError, match="dataset probe"):
        precompute(other, ["mlp:16-8-3"], out_path, chunk_rows=CHUNK, random_teacher=True)
    with open_transfer_set(out_path) as ts:
        np.testing.assert_array_equal(ts.logits(), before)
    precompute(other, ["mlp:16-8-3"], out_path, chunk_rows=CHUNK, overwrite=True,
               random_teacher=True)
    with open_transfer_set(out_path) as ts:
        assert not np.array_equal(ts.logits(), before)


def test_unlabelled_data_gets_minus_one(tmp_path: Path, suffix: str) -> None:
    data = make_npz(tmp_path / "u.npz", labels=False)
    precompute(data, ["mlp:16-8-3"], tmp_path / f"u.{suffix}", chunk_rows=CHUNK,
               random_teacher=True)
    with open_transfer_set(tmp_path / f"u.{suffix}") as ts:
        assert (ts.labels() == -1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperatures=[0]), "temperatures must be positive"),
    (dict(temperatures=[float("nan")]), "temperatures must be positive"),
    (dict(batch_size=0), "batch size must be positive"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(combine="max"), "combine must be one of"),
])
def test_bad_options(npz_data: str, tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SoftlabelsError, match=match):
        precompute(npz_data, ["mlp:16-8-3"], tmp_path / "s.zarr", **kwargs, random_teacher=True)
    assert not (tmp_path / "s.zarr").exists()


def test_bad_specs_and_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(SoftlabelsError, match="no array 'x'"):
        precompute(f"npz:{tmp_path}/nox.npz", ["mlp:16-3"], tmp_path / "s.zarr",
                   random_teacher=True)
    data = make_npz(tmp_path / "d.npz")
    for teacher, match in [("mlp:16-x-3", "malformed mlp"), ("bogus:1", "unknown MODEL scheme"),
                           ("python:helpers:missing", "no callable 'missing'"),
                           ("python:no_such_module:f", "cannot import"),
                           ("missing.pt", "no checkpoint")]:
        with pytest.raises(SpecError, match=match):
            precompute(data, [teacher], tmp_path / "s.zarr", random_teacher=True)
    with pytest.raises(SoftlabelsError, match="does not exist"):
        precompute(f"mnist:{tmp_path}/nothing", ["mlp:784-10"], tmp_path / "s.zarr",
                   random_teacher=True)
    assert not (tmp_path / "s.zarr").exists()


def test_members_must_agree_on_classes(npz_data: str, tmp_path: Path) -> None:
    with pytest.raises(MismatchError, match="disagree on the number of classes"):
        precompute(npz_data, ["mlp:16-8-3", "python:helpers:four_classes"], tmp_path / "s.zarr",
                   random_teacher=True)


def test_nan_output_names_first_bad_row(npz_data: str, tmp_path: Path) -> None:
    x = load_data(npz_data).x.flatten(1)
    first = int(torch.nonzero(x[:, 0] > 1.5)[0])
    with pytest.raises(TeacherOutputError, match=f"at row {first} "):
        precompute(npz_data, ["python:helpers:nan_teacher"], tmp_path / "s.zarr",
                   chunk_rows=CHUNK, batch_size=7, random_teacher=True)
    with pytest.raises(SoftlabelsError, match="incomplete"):
        open_transfer_set(tmp_path / "s.zarr")


def test_sharded_zarr_blocks_are_shards(npz_data: str, tmp_path: Path) -> None:
    """With --shard-rows a block is one shard: same content, one file per shard, resumable."""
    plain, sharded = tmp_path / "plain.zarr", tmp_path / "sharded.zarr"
    args = dict(temperatures=[1, 4], chunk_rows=8, batch_size=5)
    precompute(npz_data, ["mlp:16-8-3"], plain, **args, random_teacher=True)
    precompute(npz_data, ["mlp:16-8-3"], sharded, shard_rows=32, **args, random_teacher=True)
    with open_transfer_set(plain) as a, open_transfer_set(sharded) as b:
        assert b.block_rows == 32 and len(b.store.read(S.BLOCK_DONE)) == 4
        for name in (S.LOGITS, S.PROBS, S.LABELS, S.INDEX, S.SAMPLE_HASH):
            np.testing.assert_array_equal(a.read(name), b.read(name))
    assert len(list((sharded / "logits" / "c").rglob("*"))) == 4 + 4  # 4 dirs, 4 shard files
    from softlabels.format.backends import open_store

    with open_store(sharded, "r+") as store:  # interrupt: block 2 undone, its shard removed
        done = store.read(S.BLOCK_DONE)
        done[2] = 0
        store.write(S.BLOCK_DONE, slice(None), done)
        store.set_meta({**store.get_meta(), "status": "writing"})
    result = precompute(npz_data, ["mlp:16-8-3"], sharded, shard_rows=32, **args,
                        random_teacher=True)
    assert result.resumed and result.rows_computed == 32
    with open_transfer_set(plain) as a, open_transfer_set(sharded) as b:
        np.testing.assert_array_equal(a.read(S.PROBS), b.read(S.PROBS))

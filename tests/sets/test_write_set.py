"""`softlabels.sets.write_set` and `softlabels import --logits/--topk-*`: a verifiable example set
from arrays you already have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import CHUNK, N_CLASSES, N_ROWS
from softlabels import write_set
from softlabels.cli import cli
from softlabels.errors import DataError, MismatchError, OptionError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify
from softlabels.sources.load import load_data
from softlabels.train.datasets import SoftTargetDataset

C = 7


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(N_ROWS, C)).astype(np.float32) * 3


def test_dense_set_verifies_against_its_data(tmp_path: Path, npz_data: str, suffix: str,
                                             logits: np.ndarray) -> None:
    out = tmp_path / f"d.{suffix}"
    write_set(out, logits=logits, data=npz_data, teacher_name="my-model",
              temperatures=[1, 4], chunk_rows=CHUNK)
    report = verify(out, data=npz_data)
    assert report.ok, report
    data = load_data(npz_data)
    with open_transfer_set(out) as ts:
        assert ts.meta["teacher"]["members"][0] == {"spec": "imported:my-model", "sha256": "",
                                                    "source": "my-model"}
        assert ts.meta["dataset"]["spec"] == npz_data and ts.num_blocks > 1
        np.testing.assert_array_equal(ts.logits(), logits)
        np.testing.assert_allclose(ts.probs(4.0), torch.softmax(torch.from_numpy(logits) / 4,
                                                                1), rtol=1e-6)
        np.testing.assert_array_equal(ts.labels(), data.y.numpy())  # the data's labels
        assert ts.sample_hash()[5] == S.sample_hash(data.x[5].numpy())
    SoftTargetDataset(data, out, temperature=4.0)  # joins and checks alignment by hash


def test_topk_with_logsumexp_is_exact_at_each_t(tmp_path: Path, npz_data: str,
                                                logits: np.ndarray) -> None:
    z = torch.from_numpy(logits)
    top = torch.topk(z, 3)
    perm = np.random.default_rng(0).permuted(np.tile(np.arange(3), (N_ROWS, 1)), axis=1)
    idx = np.take_along_axis(top.indices.numpy(), perm, 1)  # in any order: stored largest first
    val = np.take_along_axis(top.values.numpy(), perm, 1)
    lse = np.stack([torch.logsumexp(z / t, 1).numpy() for t in (1.0, 2.0)], 1)
    out = tmp_path / "k.zarr"
    write_set(out, topk_indices=idx, topk_values=val, logsumexp=lse, num_classes=C,
              data=npz_data, teacher_name="m", temperatures=[1, 2], chunk_rows=CHUNK)
    assert verify(out, data=npz_data).ok
    with open_transfer_set(out) as ts:
        np.testing.assert_array_equal(ts.read(S.TOPK_INDICES), top.indices.numpy())
        for t in (1.0, 2.0):
            classes, weights = ts.sparse_targets(t)
            np.testing.assert_allclose(
                weights, np.take_along_axis(torch.softmax(z / t, 1).numpy(), classes, 1),
                rtol=1e-5)


def test_cli_logprobs_from_npy_files(tmp_path: Path, npz_data: str,
                                     logits: np.ndarray) -> None:
    lp = torch.log_softmax(torch.from_numpy(logits), 1)
    top = torch.topk(lp, 4)
    np.save(tmp_path / "i.npy", top.indices.numpy().astype(np.int32))
    np.save(tmp_path / "v.npy", top.values.numpy())
    np.save(tmp_path / "labels.npy", np.full(N_ROWS, -1))
    args = ["import", "--topk-indices", str(tmp_path / "i.npy"), "--topk-values",
            str(tmp_path / "v.npy"), "--labels", str(tmp_path / "labels.npy"),
            "--num-classes", str(C), "--data", npz_data, "--teacher-name", "vllm-run",
            "--out", str(tmp_path / "lp.zarr"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["temperatures"] == [1.0] and summary["sparse"] == {"kind": "topk", "k": 4}
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "lp.zarr"), "--data", npz_data])
    assert result.exit_code == 0, result.output
    with open_transfer_set(tmp_path / "lp.zarr") as ts:
        assert ts.meta["teacher"]["targets"]["exact_temperatures"] == [1.0]
        assert (ts.labels() == -1).all()
        np.testing.assert_allclose(ts.sparse_targets(1.0)[1], top.values.exp().numpy(),
                                   rtol=1e-6)
    result = CliRunner().invoke(cli, [*args[:-3], "--out", str(tmp_path / "t2.zarr"),
                                      "--temperatures", "1,2"])
    assert result.exit_code == 1 and "exact at T = 1 only" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    ({"labels": np.zeros(N_ROWS + 1, np.int64)}, DataError, r"labels must be a \(103\)"),
    ({"index": np.arange(N_ROWS) + 1}, DataError, r"index must lie in \[0, 103\)"),
    ({"logits": np.zeros((N_ROWS, C), np.int64)}, DataError, "float array"),
    ({"labels": np.full(N_ROWS, C)}, DataError, "labels"),
    ({"topk_indices": np.zeros((N_ROWS, 2), np.int32)}, OptionError, "either logits"),
])
def test_bad_arrays_refused_before_writing(tmp_path: Path, npz_data: str, logits: np.ndarray,
                                           kwargs: dict, error: type, match: str) -> None:
    args = {"logits": logits, **kwargs}
    with pytest.raises(error, match=match):
        write_set(tmp_path / "o.zarr", data=npz_data, teacher_name="m", **args)
    assert not (tmp_path / "o.zarr").exists()


def test_topk_mass_past_one_and_other_data_refused(tmp_path: Path, npz_data: str,
                                                   logits: np.ndarray) -> None:
    z = torch.from_numpy(logits)
    top = torch.topk(z, 3)
    wrong = torch.logsumexp(top.values, 1, keepdim=True).numpy() - 0.5  # not over all classes
    with pytest.raises(DataError, match=r"sum to .* > 1"):
        write_set(tmp_path / "o.zarr", topk_indices=top.indices.numpy(),
                  topk_values=top.values.numpy(), logsumexp=wrong, num_classes=C,
                  data=npz_data, teacher_name="m")
    write_set(tmp_path / "d.zarr", logits=logits, data=npz_data, teacher_name="m",
              chunk_rows=CHUNK)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros((N_ROWS, 1, 4, 4), np.float32), y=np.zeros(N_ROWS, np.int64))
    assert not verify(tmp_path / "d.zarr", data=f"npz:{other}").ok
    with pytest.raises(MismatchError):  # a rerun onto other data is refused, not mixed in
        write_set(tmp_path / "d.zarr", logits=logits, data=f"npz:{other}", teacher_name="m",
                  chunk_rows=CHUNK)
    assert N_CLASSES < C


def test_cli_logits_then_train_a_student(tmp_path: Path, npz_data: str,
                                         logits: np.ndarray) -> None:
    np.save(tmp_path / "z.npy", logits)
    out = tmp_path / "mine.zarr"
    result = CliRunner().invoke(cli, ["import", "--logits", str(tmp_path / "z.npy"), "--data",
                                      npz_data, "--teacher-name", "my-model", "--out", str(out),
                                      "--temperatures", "1,4"])
    assert result.exit_code == 0, result.output
    assert "103 rows, dense over 7 classes" in result.output
    result = CliRunner().invoke(cli, ["train", "--data", npz_data, "--model", f"mlp:16-{C}",
                                      "--out", str(tmp_path / "s.pt"), "--transfer-set",
                                      str(out), "--temperature", "4", "--epochs", "1"])
    assert result.exit_code == 0, result.output

"""Sparse transfer sets: top-k (exact top-k probabilities and residual) and sampled classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import CHUNK, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.format.reader import open_transfer_set
from softlabels.train.losses import kd_loss, sparse_kd_loss


@pytest.fixture
def six_class_data(tmp_path: Path) -> str:
    return make_npz(tmp_path / "six.npz", n=77, classes=6)


def test_topk_probabilities_are_exact_at_every_stored_t(tmp_path: Path, six_class_data: str,
                                                        suffix: str) -> None:
    args = dict(temperatures=[1, 2.5, 8], chunk_rows=CHUNK, dtype="float32")
    precompute(six_class_data, ["mlp:16-9-6"], tmp_path / "dense.zarr", **args, random_teacher=True)
    precompute(six_class_data, ["mlp:16-9-6"], tmp_path / f"top.{suffix}", topk=2, **args,
               random_teacher=True)
    with open_transfer_set(tmp_path / "dense.zarr") as d, \
            open_transfer_set(tmp_path / f"top.{suffix}") as s:
        assert not s.has("logits") and not s.has("probs")
        for t in (1.0, 2.5, 8.0):
            classes, weights = s.sparse_targets(t)
            dense = d.probs(t)
            np.testing.assert_array_equal(classes, np.argsort(-dense, 1, kind="stable")[:, :2])
            np.testing.assert_allclose(weights, np.take_along_axis(dense, classes, 1),
                                       rtol=1e-5)
            rebuilt = s.probs(t)  # top-k exact, the residual spread over the other classes
            np.testing.assert_allclose(rebuilt.sum(1), 1, rtol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(rebuilt, classes, 1), weights)
        with pytest.raises(SoftlabelsError,
                           match=r"stored temperatures \[1.0, 2.5, 8.0\] only, not 3.0"):
            s.sparse_targets(3.0)


def test_sampled_classes_follow_p_t_and_replay(tmp_path: Path, six_class_data: str) -> None:
    args = dict(temperatures=[2], chunk_rows=CHUNK, sample_k=4000, batch_size=16)
    precompute(six_class_data, ["mlp:16-9-6"], tmp_path / "a.zarr", **args, random_teacher=True)
    precompute(six_class_data, ["mlp:16-9-6"], tmp_path / "b.h5", **args, random_teacher=True)
    precompute(six_class_data, ["mlp:16-9-6"], tmp_path / "d.zarr", temperatures=[2],
               chunk_rows=CHUNK, random_teacher=True)
    with open_transfer_set(tmp_path / "a.zarr") as a, open_transfer_set(tmp_path / "b.h5") as b, \
            open_transfer_set(tmp_path / "d.zarr") as d:
        np.testing.assert_array_equal(a.sparse_targets(2.0)[0], b.sparse_targets(2.0)[0])
        freq = a.probs(2.0)  # sampled frequencies
        np.testing.assert_allclose(freq, d.probs(2.0), atol=0.04)


def test_sparse_loss_with_all_but_one_class_equals_dense_kd() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (5,), generator=g)
    p = torch.softmax(t / 3, -1)
    top = torch.topk(p, 5)  # the residual bucket is then exactly the sixth class
    sparse = sparse_kd_loss(s, top.indices, top.values, temperature=3.0, labels=y, alpha=0.7)
    dense = kd_loss(s, t, temperature=3.0, labels=y, alpha=0.7)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-9)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_dense,) = torch.autograd.grad(dense, s)
    torch.testing.assert_close(g_sparse, g_dense)


@pytest.mark.slow
def test_sampled_loss_gradient_is_unbiased() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(3, 8, generator=g, dtype=torch.float64), -1)
    draws = torch.multinomial(p, 20000, replacement=True, generator=g)
    w = torch.full(draws.shape, 1 / draws.shape[1], dtype=torch.float64)
    (g_sampled,) = torch.autograd.grad(
        sparse_kd_loss(s, draws, w, temperature=1.0, convention="estimate"), s)
    (g_dense,) = torch.autograd.grad(kd_loss(s, p.log(), temperature=1.0), s)
    torch.testing.assert_close(g_sampled, g_dense, atol=0.01, rtol=0)


def test_students_train_from_sparse_sets_and_bad_options(tmp_path: Path,
                                                         six_class_data: str) -> None:
    runner = CliRunner()
    for flag in ("--topk", "--sample-k"):
        out = tmp_path / f"{flag[2:]}.zarr"
        r = runner.invoke(cli, ["precompute", "--data", six_class_data, "--teacher", "mlp:16-6",
                                "--out", str(out), flag, "3", "--temperatures", "1,4",
                                "--random-teacher"])
        assert r.exit_code == 0, r.stderr
        r = runner.invoke(cli, ["train", "--data", six_class_data, "--model", "mlp:16-8-6",
                                "--out", str(tmp_path / "s.pt"), "--transfer-set", str(out),
                                "--temperature", "4", "--epochs", "1"])
        assert r.exit_code == 0, r.stderr
    for extra, message in ((["--topk", "6"], "--topk must lie in [1, 5]"),
                           (["--topk", "2", "--combine", "mean-probs"], "exact under"),
                           (["--topk", "2", "--sample-k", "2"], "not both")):
        r = runner.invoke(cli, ["precompute", "--data", six_class_data, "--teacher", "mlp:16-6",
                                "--out", str(tmp_path / "bad.zarr"), *extra, "--random-teacher"])
        assert r.exit_code == 1 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr

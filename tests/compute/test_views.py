"""Augmented views: stored per view, replayed exactly in stage two and by verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.compute.views import view_seed
from softlabels.errors import SoftlabelsError, UntrustedCodeError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify
from softlabels.sources.load import load_data
from softlabels.teachers.models import load_model
from softlabels.train.datasets import SoftTargetDataset


@pytest.fixture
def images(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x=rng.random((23, 1, 8, 8), dtype=np.float32),
             y=rng.integers(0, 3, 23))
    return f"npz:{tmp_path}/img.npz"


SPEC = "random-crop:2,hflip"


def test_views_replay_the_same_across_batch_sizes_and_workers(tmp_path: Path,
                                                              images: str) -> None:
    common = dict(temperatures=[1, 4], views=3, augment=SPEC, chunk_rows=8, dtype="float32")
    precompute(images, ["mlp:64-5-3"], tmp_path / "a.zarr", batch_size=5, **common,
               random_teacher=True)
    precompute(images, ["mlp:64-5-3"], tmp_path / "b.h5", batch_size=16, num_workers=2,
               **common, random_teacher=True)
    with open_transfer_set(tmp_path / "a.zarr") as a, open_transfer_set(tmp_path / "b.h5") as b:
        assert a.num_rows == 69 and a.meta["views"] == 3 and a.meta["augment"] == SPEC
        assert a.index().tolist() == [r // 3 for r in range(69)]
        seeds = a.read(S.VIEW_SEED)
        assert seeds.tolist() == [view_seed(0, r // 3, r % 3) for r in range(69)]
        np.testing.assert_array_equal(seeds, b.read(S.VIEW_SEED))
        np.testing.assert_array_equal(a.sample_hash(), b.sample_hash())
        np.testing.assert_allclose(a.logits(), b.logits(), rtol=1e-6, atol=1e-7)
        z = a.logits()
        assert not np.allclose(z[0::3], z[1::3])  # the views differ, so do the targets


def test_stage_two_sees_exactly_the_view_the_teacher_labelled(tmp_path: Path,
                                                              images: str) -> None:
    path = tmp_path / "v.zarr"
    precompute(images, ["mlp:64-5-3"], path, temperatures=[2], views=4, augment=SPEC,
               dtype="float32", random_teacher=True)
    torch.manual_seed(0)
    teacher = load_model("mlp:64-5-3")[0].eval()
    ds = SoftTargetDataset(images, path, temperature=2.0)
    original = load_data(images)
    with open_transfer_set(path) as ts, torch.no_grad():
        stored = ts.logits()
        changed = 0
        for r in range(len(ds)):
            x, _, _ = ds[r]
            assert torch.equal(x, ds[r][0])  # replaying twice gives the same bytes
            np.testing.assert_allclose(teacher(x[None])[0].numpy(), stored[r], rtol=1e-5,
                                       atol=1e-6)
            changed += not torch.equal(x, original[r // 4][0])
    assert changed > len(ds) // 2
    assert verify(path, data=images, teachers=["mlp:64-5-3"], sample=30).ok


def test_training_from_views(tmp_path: Path, images: str) -> None:
    path = tmp_path / "v.zarr"
    precompute(images, ["mlp:64-5-3"], path, temperatures=[2], views=3, augment=SPEC,
               random_teacher=True)
    result = CliRunner().invoke(cli, ["train", "--data", images, "--model", "mlp:64-8-3",
                                      "--out", str(tmp_path / "s.pt"), "--transfer-set",
                                      str(path), "--epochs", "2", "--views-per-epoch", "2"])
    assert result.exit_code == 0, result.stderr
    assert "on 46 rows" in result.stdout  # 23 examples x 2 views each epoch


@pytest.mark.parametrize("kwargs, message", [
    (dict(views=0, augment="hflip"), "--views must be positive"),
    (dict(views=2, augment=None), "come with --augment"),
    (dict(views=2, augment="blur:3"), "unknown augmentation step 'blur:3'; valid forms: "
                                      "random-crop:PAD"),
    (dict(views=2, augment="random-crop:x"), "bad value"),
    (dict(views=2, augment="python:helpers:nondeterministic"), "not deterministic"),
])
def test_bad_view_options(tmp_path: Path, images: str, kwargs: dict, message: str) -> None:
    with pytest.raises(SoftlabelsError, match=message):
        precompute(images, ["mlp:64-3"], tmp_path / "v.zarr", **kwargs, random_teacher=True)
    assert not (tmp_path / "v.zarr").exists()


def test_python_factory_augment(tmp_path: Path, images: str) -> None:
    precompute(images, ["mlp:64-3"], tmp_path / "v.zarr", views=2,
               augment="python:helpers:shift_right", dtype="float32", random_teacher=True)
    with pytest.raises(UntrustedCodeError, match="pass --trust-code"):  # the set names code
        SoftTargetDataset(images, tmp_path / "v.zarr", temperature=1.0)
    sds = SoftTargetDataset(images, tmp_path / "v.zarr", temperature=1.0, trust_code=True)
    x = load_data(images)[0][0]  # rows 0 and 1 are the two views of example 0
    for row in (0, 1):
        torch.testing.assert_close(sds[row][0], torch.roll(x, 1, dims=-1), rtol=0, atol=0)

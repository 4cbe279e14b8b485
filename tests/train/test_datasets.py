"""Joining data and soft targets: alignment checks, subsets, chunk-aware streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import CHUNK, N_ROWS
from softlabels.compute.blocks import precompute
from softlabels.errors import MismatchError, SoftlabelsError
from softlabels.format.reader import open_transfer_set
from softlabels.format.selection import select_rows
from softlabels.sources.arrays import NpzDataset
from softlabels.train.datasets import SoftTargetDataset, StreamingSoftTargetDataset
from softlabels.train.epochs import block_windows


@pytest.fixture
def made(npz_data: str, out_path: Path) -> tuple[str, Path]:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return npz_data, out_path


def test_items_are_input_label_target(made: tuple[str, Path]) -> None:
    data, path = made
    ds = SoftTargetDataset(data, path, temperature=4.0)
    with open_transfer_set(path) as ts:
        probs4, probs2 = ts.probs(4.0), ts.probs(2.0)
    x, y, t = ds[7]
    raw = NpzDataset(data[4:])
    assert torch.equal(x, raw[7][0]) and y == raw[7][1]
    np.testing.assert_array_equal(t.numpy(), probs4[7])
    ds2 = SoftTargetDataset(data, path, temperature=2.0)  # not stored: re-tempered
    np.testing.assert_allclose(ds2[7][2].numpy(), probs2[7], rtol=1e-6)


@pytest.mark.parametrize("edit, match", [
    ("permute", "row 0 .* does not match"), ("shorter", "is shorter"),
    ("longer", "is longer"), ("edit", "row 50 .*does not match")])
def test_misaligned_data_is_refused(made: tuple[str, Path], tmp_path: Path, edit: str,
                                    match: str) -> None:
    data, path = made
    with np.load(data[4:]) as f:
        x, y = f["x"].copy(), f["y"].copy()
    if edit == "permute":
        x, y = x[::-1].copy(), y[::-1].copy()
    elif edit == "shorter":
        x, y = x[:-1], y[:-1]
    elif edit == "longer":
        x, y = np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])
    else:
        x[50, 0, 0, 0] += 0.5
    np.savez(tmp_path / "e.npz", x=x, y=y)
    with pytest.raises(MismatchError, match=match):
        SoftTargetDataset(f"npz:{tmp_path}/e.npz", path, temperature=1.0)
    with pytest.raises(MismatchError, match=match):
        StreamingSoftTargetDataset(f"npz:{tmp_path}/e.npz", path, temperature=1.0)


def test_bad_temperature(made: tuple[str, Path]) -> None:
    with pytest.raises(SoftlabelsError, match="temperature must be positive"):
        SoftTargetDataset(made[0], made[1], temperature=0)


def test_stratified_fraction_is_seeded_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    a = select_rows(labels, fraction=0.1, seed=3)
    assert np.array_equal(a, select_rows(labels, fraction=0.1, seed=3))
    assert not np.array_equal(a, select_rows(labels, fraction=0.1, seed=4))
    assert np.bincount(labels[a]).tolist() == [10, 5, 3, 2]
    assert np.bincount(labels[select_rows(labels, fraction=0.01)]).tolist() == [1, 1, 1, 1]


def test_class_lists_and_indices() -> None:
    labels = np.array([0, 1, 2, 3, 3, 1])
    assert select_rows(labels, classes=[1, 3]).tolist() == [1, 3, 4, 5]
    assert select_rows(labels, exclude_classes=[3]).tolist() == [0, 1, 2, 5]
    index = np.array([10, 11, 12, 13, 14, 15])
    assert select_rows(labels, index=index, indices=np.array([15, 10])).tolist() == [0, 5]
    with pytest.raises(SoftlabelsError, match=r"classes the data lacks: \[7\]"):
        select_rows(labels, classes=[7])
    with pytest.raises(SoftlabelsError, match="select no rows"):
        select_rows(labels, classes=[0], exclude_classes=[0])
    with pytest.raises(SoftlabelsError, match=r"fraction must lie in \(0, 1\]"):
        select_rows(labels, fraction=1.5)


@pytest.mark.parametrize("world, window", [(1, 1), (2, 1), (1, 3), (2, 2), (3, 2), (1, 64)])
def test_block_windows_cover_every_block_once(world: int, window: int) -> None:
    blocks = -(-N_ROWS // CHUNK)
    for epoch in range(3):
        plans = [block_windows(blocks, window=window, epoch=epoch, seed=1, rank=r,
                               world_size=world) for r in range(world)]
        seen = [b for plan in plans for w in plan for b in w]
        assert sorted(seen) == list(range(blocks))
        for plan in plans:  # from window to 2 x window - 1 blocks; all of a rank's if fewer
            n = sum(len(w) for w in plan)
            assert all(min(window, n) <= len(w) < 2 * window for w in plan)
    orders = {tuple(map(tuple, block_windows(blocks, window=2, epoch=e, seed=1)))
              for e in range(4)}
    assert len(orders) > 1  # reshuffled per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_yields_every_selected_row_once(made: tuple[str, Path], workers: int) -> None:
    data, path = made
    rows = np.arange(0, N_ROWS, 2)
    ds = StreamingSoftTargetDataset(data, path, temperature=4.0, rows=rows, window=2, seed=0)
    raw = NpzDataset(data[4:])
    with open_transfer_set(path) as ts:
        probs = ts.probs(4.0)
    firsts = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        got = []
        for x, _, t in DataLoader(ds, batch_size=5, num_workers=workers):
            for xi, ti in zip(x, t):
                i = int(np.flatnonzero((raw.x == xi).flatten(1).all(1))[0])
                np.testing.assert_array_equal(ti.numpy(), probs[i])
                got.append(i)
        assert sorted(got) == rows.tolist()
        firsts.append(got[:10])
    assert firsts[0] != firsts[1]

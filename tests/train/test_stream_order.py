"""A streamed epoch's order: it mixes the whole set into every batch, it is a function of
(seed, epoch, rank, world size) and not of DataLoader workers, and it resumes mid-epoch to
the same remaining batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.train.datasets import SoftTargetBatches
from softlabels.train.epochs import mix

ROWS, CHUNK = 1_100, 16  # 69 blocks, the last one short


@pytest.fixture(scope="module", params=["dense", "topk"])
def numbered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             ) -> tuple[str, Path]:
    """A set whose example i has input (i,): a batch's inputs name its rows."""
    folder = tmp_path_factory.mktemp(request.param)
    x = np.arange(ROWS, dtype=np.float32)[:, None]
    y = np.random.default_rng(0).integers(0, 5, ROWS)
    np.savez(folder / "x.npz", x=x, y=y)
    data, path = f"npz:{folder / 'x.npz'}", folder / "set.zarr"
    precompute(data, ["mlp:1-5"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               topk=2 if request.param == "topk" else 0, random_teacher=True)
    return data, path


def _rows(batch: tuple[torch.Tensor, ...]) -> list[int]:
    return batch[0][:, 0].long().tolist()


def _epoch(batches: object) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in b) for b in batches]


def _same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))


def test_a_batch_mixes_most_of_the_set(numbered: tuple[str, Path]) -> None:
    data, path = numbered
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=256)
    spans = [mix(np.array(_rows(b)), ROWS) for b in stream if len(b[1]) == 256]
    assert len(spans) == ROWS // 256 and min(spans) >= 50  # of 64 slices
    # a window of 4 blocks (64 rows) cannot: a batch spans the 16 or so blocks it draws from
    narrow = SoftTargetBatches(data, path, temperature=4.0, batch_size=256, window=4)
    assert max(mix(np.array(_rows(b)), ROWS) for b in narrow) < 40


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [2, 3])
def test_the_order_does_not_depend_on_workers(numbered: tuple[str, Path], workers: int) -> None:
    data, path = numbered
    rows = np.arange(0, ROWS, 3)  # a subset: 367 rows, windows of uneven sizes
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=16, rows=rows,
                               window=8, rank=1, world_size=2)
    stream.piece_batches = 3  # pieces of 48 rows, many of them across windows
    stream.set_epoch(2)
    direct = _epoch(stream)
    assert len(_rows_of_rank(direct)) == len(set(_rows_of_rank(direct)))  # each row once
    assert len(direct) == stream.steps_per_epoch()
    _same(direct, _epoch(DataLoader(stream, batch_size=None, num_workers=workers)))
    _same(direct, _epoch(stream.loader(num_workers=workers, persistent_workers=False)))
    _same(direct, _epoch(stream.loader(num_workers=0)))
    stream.set_epoch(3)
    assert [_rows(b) for b in _epoch(stream)] != [_rows(b) for b in direct]


def _rows_of_rank(batches: list[tuple[torch.Tensor, ...]]) -> list[int]:
    return [r for b in batches for r in _rows(b)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumes_mid_epoch_to_the_same_batches(numbered: tuple[str, Path],
                                                       workers: int) -> None:
    data, path = numbered
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=32, window=16, seed=5)
    stream.piece_batches = 2
    stream.set_epoch(1)
    whole = _epoch(stream.loader(num_workers=workers))
    stream.set_epoch(1)
    seen = []
    for b in stream.loader(num_workers=workers):
        seen.append(tuple(t.clone() for t in b))
        if len(seen) == 13:
            break
    state = stream.state_dict()
    assert state == {"epoch": 1, "batches": 13, "seed": 5}
    again = SoftTargetBatches(data, path, temperature=4.0, batch_size=32, window=16, seed=5)
    again.load_state_dict(state)
    assert len(again) == len(whole) - 13
    rest = _epoch(again.loader(num_workers=workers))
    _same(seen + rest, whole)
    assert again.state_dict()["batches"] == len(whole)
    with pytest.raises(SoftlabelsError, match="seed 5"):
        SoftTargetBatches(data, path, temperature=4.0, batch_size=32, seed=6).load_state_dict(
            state)


def test_float16_serving_returns_the_float32_targets_rounded(numbered: tuple[str, Path]) -> None:
    data, path = numbered
    wide = _epoch(SoftTargetBatches(data, path, temperature=4.0, batch_size=64))
    half = _epoch(SoftTargetBatches(data, path, temperature=4.0, batch_size=64,
                                    dtype=torch.float16))
    for w, h in zip(wide, half):
        assert torch.equal(w[0], h[0]) and torch.equal(w[1], h[1])
        assert h[-1].dtype == torch.float16
        assert torch.equal(h[-1], w[-1].half())


def test_batches_a_consumer_keeps_are_never_overwritten(numbered: tuple[str, Path]) -> None:
    data, path = numbered
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=64, window=16)
    kept = list(stream)  # held across the next epochs: their windows may not be lent again
    copies = [tuple(t.clone() for t in b) for b in kept]
    for epoch in range(1, 4):
        stream.set_epoch(epoch)
        assert sum(len(b[1]) for b in stream) == ROWS
    _same(kept, copies)
    del kept
    stream.set_epoch(0)  # once released, the memory is lent again: the same epoch, the same rows
    _same(_epoch(stream), copies)
    assert stream._pool.kept


def test_a_hybrid_set_streams_its_three_target_columns(tmp_path: Path) -> None:
    x = np.arange(200, dtype=np.float32)[:, None]
    np.savez(tmp_path / "x.npz", x=x, y=np.random.default_rng(1).integers(0, 6, 200))
    data, path = f"npz:{tmp_path / 'x.npz'}", tmp_path / "h.zarr"
    precompute(data, ["mlp:1-6"], path, temperatures=[1, 3], chunk_rows=CHUNK, topk=3,
               nucleus=0.7, tail=2, random_teacher=True)
    from softlabels.format.reader import open_transfer_set

    with open_transfer_set(path) as ts:
        want = ts.sparse_targets(3.0)
    seen = []
    for batch in SoftTargetBatches(data, path, temperature=3.0, batch_size=32):
        rows = _rows(batch)
        assert len(batch) == 5  # inputs, labels, classes, weights, log p
        for got, w in zip(batch[2:], want):
            np.testing.assert_allclose(got.numpy(), w[rows], rtol=1e-6)
        seen += rows
    assert sorted(seen) == list(range(200))

"""Stage one's vectorised batch path (issue 22.1) writes, bit for bit, the arrays the row-by-row
path wrote: every array, checksum and the fingerprint, recomputed here independently (the model
run on the same batches, softmax in torch, storage dtypes cast by numpy, hashes row by row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conftest import CHUNK, make_npz
from softlabels.compute.blocks import precompute
from softlabels.compute.examples import block_batches, device_outputs
from softlabels.format import schema as S
from softlabels.format.layout import Layout
from softlabels.format.reader import open_transfer_set
from softlabels.sources.load import load_data

TEMPS = [1.0, 4.0]
BATCH = 7  # not a divisor of CHUNK (16) nor of the 103 rows


def _model(seed: int, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes)).eval()


def _stored(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with open_transfer_set(path) as ts:
        names = [*ts.row_arrays(), S.ARRAY_CHECKSUM]
        return {name: ts.read(name) for name in names}, ts.meta


def _recompute(x: torch.Tensor, models: list[nn.Module], layout: Layout) -> np.ndarray:
    """(M, N, C) float32 member logits, each block cut into the batches precompute uses."""
    out = []
    for batch in block_batches(layout, range(layout.num_blocks), BATCH):
        with torch.inference_mode():
            out.append(torch.stack([m(x[batch[0]:batch[-1] + 1]) for m in models]))
    return torch.cat(out, dim=1).numpy()


def _expected_dense(x: torch.Tensor, y: np.ndarray, models: list[nn.Module],
                    layout: Layout) -> dict[str, np.ndarray]:
    z = torch.from_numpy(_recompute(x, models, layout))
    combined = z.mean(0) if len(models) > 1 else z[0]
    probs = torch.stack([torch.softmax(combined / t, dim=-1) for t in TEMPS])
    want = {S.LOGITS: combined.numpy().astype(np.float16),
            S.PROBS: probs.numpy().astype(np.float32),
            S.LABELS: y.astype(np.int64), S.INDEX: np.arange(len(x), dtype=np.int64),
            S.SAMPLE_HASH: np.array([S.sample_hash(xi) for xi in x.numpy()], np.uint64)}
    if layout.num_members:
        want[S.MEMBER_LOGITS] = z.numpy().astype(np.float16)
    if layout.input_shape is not None:
        want[S.INPUTS] = x.numpy()
    return want


def _checksums(layout: Layout, want: dict[str, np.ndarray]) -> np.ndarray:
    rows = []
    for b in range(layout.num_blocks):
        a, z = layout.block_range(b)
        rows.append(layout.block_checksums(
            {n: (v[:, a:z] if S.row_axis(n) else v[a:z]) for n, v in want.items()}))
    return np.stack(rows)


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        # bytes, not values: float16 rounding and NaN-free payloads must agree bit for bit
        assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name


@pytest.mark.parametrize("members,extra", [(1, {}), (2, {"keep_members": True,
                                                          "store_inputs": True})],
                         ids=["one", "ensemble-members-inputs"])
def test_a_dense_set_is_what_an_independent_recomputation_gives(
        tmp_path: Path, suffix: str, members: int, extra: dict) -> None:
    data = make_npz(tmp_path / "d.npz", classes=5)
    models = [_model(s) for s in range(members)]
    out = tmp_path / f"s.{suffix}"
    precompute(data, models, out, temperatures=TEMPS, chunk_rows=CHUNK, batch_size=BATCH,
               **extra)
    got, meta = _stored(out)
    layout = Layout.from_meta(meta)
    x = load_data(data).x
    want = _expected_dense(x, np.load(tmp_path / "d.npz")["y"], models, layout)
    assert set(got) == {*want, S.ARRAY_CHECKSUM}
    _assert_same(got, want)
    np.testing.assert_array_equal(got[S.ARRAY_CHECKSUM], _checksums(layout, want))
    assert meta["dataset"]["fingerprint"] == S.fingerprint(want[S.SAMPLE_HASH])


def test_a_topk_set_is_what_an_independent_recomputation_gives(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", classes=5)
    model = _model(0, classes=9)
    out = tmp_path / "s.zarr"
    precompute(data, [model], out, temperatures=TEMPS, chunk_rows=CHUNK, batch_size=BATCH,
               topk=3)
    got, meta = _stored(out)
    layout = Layout.from_meta(meta)
    z = torch.from_numpy(_recompute(load_data(data).x, [model], layout)[0])
    top = torch.topk(z, 3, dim=-1)
    lse = torch.stack([torch.logsumexp(z / t, dim=-1) for t in TEMPS], -1)
    _assert_same(got, {S.TOPK_INDICES: top.indices.int().numpy(),
                       S.TOPK_LOGITS: top.values.numpy(), S.TOPK_LOGSUMEXP: lse.numpy()})


class _ItemByItem(Dataset):
    """The same data without `get_batch`: fetched item by item and stacked."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.data[i]


@pytest.mark.parametrize("extra", [{}, {"sample_k": 3}, {"views": 2, "augment": "hflip"}],
                         ids=["dense", "sampled", "views"])
def test_batched_and_item_by_item_access_write_the_same_set(tmp_path: Path, extra: dict) -> None:
    data = load_data(make_npz(tmp_path / "d.npz", classes=5))
    x, y = data.x, data.y
    sources = {"npz": data, "items": _ItemByItem(data)}
    if not extra:
        sources |= {"tensors": TensorDataset(x, y), "float-labels": TensorDataset(x, y.double())}
    sets = {}
    for name, source in sources.items():
        out = tmp_path / f"{name}.zarr"
        precompute(source, [_model(0)], out, temperatures=TEMPS, chunk_rows=CHUNK,
                   batch_size=BATCH, **extra)
        sets[name] = _stored(out)[0]
    for name in sources:
        _assert_same(sets[name], sets["items"])


def test_inputs_alone_get_unknown_labels_in_one_fetch(tmp_path: Path) -> None:
    x = torch.randn(37, 1, 4, 4)
    precompute(TensorDataset(x), [_model(0)], tmp_path / "s.zarr", temperatures=TEMPS,
               chunk_rows=CHUNK, batch_size=BATCH)
    got, _ = _stored(tmp_path / "s.zarr")
    assert (got[S.LABELS] == -1).all() and len(got[S.LABELS]) == 37


def test_sample_hashes_are_each_rows_sample_hash() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(5, 3, 4)).astype(np.float32), rng.normal(size=7),
               np.arange(6, dtype=np.int64), np.zeros((3, 0)),
               rng.normal(size=(4, 6)).astype(np.float16)[:, ::2], np.array([[True, False]] * 3)]
    for batch in batches:
        want = np.array([S.sample_hash(row) for row in batch], dtype=np.uint64)
        np.testing.assert_array_equal(S.sample_hashes(batch), want)


def test_storage_dtypes_cast_on_the_device_round_like_numpy() -> None:
    """float32 -> float16 in torch (where the teacher ran) and numpy give the same bits,
    subnormals, ties and overflow to inf included."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    z = np.concatenate([bits[np.isfinite(bits)], rng.normal(size=50_000).astype(np.float32)
                        * np.float32(1e-6), np.array([65504, 65519.99, 65520, 6.1e-5, 2.98e-8,
                                                      2.9802322e-08], np.float32)])
    layout = Layout(num_rows=len(z), num_classes=1, temperatures=[1.0], dtype="float16",
                    probs_dtype="float16")
    t = torch.from_numpy(z)[:, None]
    got = device_outputs(layout, t[None], t, t[None])
    with np.errstate(over="ignore"):
        want = z.astype(np.float16)[:, None]
    assert got[S.LOGITS].numpy().view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    assert got[S.PROBS].numpy()[0].tobytes() == want.tobytes()


def test_loader_workers_fetch_the_same_batches(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", classes=5)
    for workers in (0, 2):
        precompute(data, [_model(0)], tmp_path / f"w{workers}.zarr", temperatures=TEMPS,
                   chunk_rows=CHUNK, batch_size=BATCH, num_workers=workers)
    _assert_same(_stored(tmp_path / "w2.zarr")[0], _stored(tmp_path / "w0.zarr")[0])

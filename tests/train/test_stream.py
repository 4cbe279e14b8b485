"""Stage two streams whole batches from whole checked blocks: every row once per epoch, the
same number of steps on every rank, damage refused with one line naming the block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checksums import forge_checksums
from click.testing import CliRunner
from torch.utils.data import DataLoader

from conftest import CHUNK, N_ROWS, ROOT, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sources.arrays import NpzDataset
from softlabels.train.datasets import SoftTargetBatches
from softlabels.train.trainer import train_student


@pytest.fixture(params=["dense", "topk"])
def made(request: pytest.FixtureRequest, npz_data: str, out_path: Path) -> tuple[str, Path]:
    topk = {"topk": 2} if request.param == "topk" else {}
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               **topk, random_teacher=True)
    return npz_data, out_path


def _row_of(raw: NpzDataset, x: torch.Tensor) -> list[int]:
    return [int(np.flatnonzero((raw.x == xi).flatten(1).all(1))[0]) for xi in x]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_cover_selected_rows_once_with_their_targets(made: tuple[str, Path],
                                                             workers: int) -> None:
    data, path = made
    rows = np.arange(1, N_ROWS, 3)  # 34 rows, not a multiple of the batch
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=5, rows=rows, window=2)
    raw = NpzDataset(data[4:])
    with open_transfer_set(path) as ts:
        want = (ts.sparse_targets(4.0) if ts.target.sparse else (ts.probs(4.0),))
        labels = ts.labels()
    orders = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        got, sizes = [], []
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        for x, y, *targets in loader:
            sizes.append(len(x))
            ids = _row_of(raw, x)
            np.testing.assert_array_equal(y.numpy(), labels[ids])
            for t, w in zip(targets, want):
                np.testing.assert_allclose(t.numpy(), w[ids], rtol=1e-6)
            got += ids
        assert sorted(got) == rows.tolist()
        assert sizes == [5] * 6 + [4]  # batch b built by worker b % workers: one tail
        assert len(sizes) == len(loader) == stream.steps_per_epoch()
        orders.append(got)
    assert orders[0] != orders[1]  # reshuffled per epoch


@pytest.mark.parametrize("world, workers", [(2, 0), (3, 0), (2, 2)])
def test_every_rank_takes_the_same_steps_deterministically(made: tuple[str, Path], world: int,
                                                           workers: int) -> None:
    data, path = made

    def epoch_of(rank: int, seed: int, epoch: int) -> list[list[int]]:
        stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=4, seed=seed,
                                   rank=rank, world_size=world)
        stream.set_epoch(epoch)
        return [b[1].tolist() + b[0].flatten(1)[:, 0].tolist()
                for b in DataLoader(stream, batch_size=None, num_workers=workers)]

    runs = [epoch_of(r, 0, 1) for r in range(world)]
    assert len({len(r) for r in runs}) == 1  # the same number of steps on every rank
    raw = NpzDataset(data[4:])
    firsts = {v for r in runs for b in r for v in b[len(b) // 2:]}
    assert len(firsts) == sum(len(b) // 2 for r in runs for b in r)  # disjoint across ranks
    assert sum(len(b) // 2 for r in runs for b in r) >= N_ROWS - world * CHUNK  # drop < 1 block
    assert epoch_of(0, 0, 1) == runs[0] and epoch_of(0, 0, 2) != runs[0]
    assert len(raw) == N_ROWS


# --- loader(): workers hand over whole windows, batches are views of them ----------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_loader_serves_selected_rows_once_in_full_batches(made: tuple[str, Path],
                                                          workers: int) -> None:
    data, path = made
    rows = np.arange(1, N_ROWS, 3)  # 34 rows in 6 blocks
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=5, rows=rows, window=2)
    loader = stream.loader(num_workers=workers)
    raw = NpzDataset(data[4:])
    with open_transfer_set(path) as ts:
        want = (ts.sparse_targets(4.0) if ts.target.sparse else (ts.probs(4.0),))
        labels = ts.labels()
    orders = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        got, sizes = [], []
        for x, y, *targets in loader:
            sizes.append(len(x))
            ids = _row_of(raw, x)
            np.testing.assert_array_equal(y.numpy(), labels[ids])
            for t, w in zip(targets, want):
                np.testing.assert_allclose(t.numpy(), w[ids], rtol=1e-6)
            got += ids
        assert sorted(got) == rows.tolist()
        assert sizes == [5] * 6 + [4]  # cut in the main process: one tail, whatever the workers
        assert len(loader) == len(sizes) == stream.steps_per_epoch()
        orders.append(got)
    assert orders[0] != orders[1]
    stream.set_epoch(1)
    again = SoftTargetBatches(data, path, temperature=4.0, batch_size=5, rows=rows, window=2)
    again.set_epoch(1)
    assert [_row_of(raw, b[0]) for b in again.loader(num_workers=workers)] == \
        [_row_of(raw, b[0]) for b in loader]  # the seed decides the order


def test_loader_batches_are_views_of_one_handed_over_piece(made: tuple[str, Path]) -> None:
    data, path = made
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=4, window=4,
                               shuffle=False)
    stream.piece_batches = 5  # pieces of 20 rows: 103 rows make 26 batches in 6 pieces
    batches = list(stream.loader(num_workers=1, pin_memory=False))  # all held: no reuse
    storages = [b[0].untyped_storage().data_ptr() for b in batches]
    groups = [storages[i:i + 5] for i in range(0, len(storages), 5)]
    assert [len(g) for g in groups] == [5] * 5 + [1]
    assert all(len(set(g)) == 1 for g in groups)  # one piece handed over, cut into views
    assert len({g[0] for g in groups}) == len(groups)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*")
def test_loader_pins_windows_and_their_batches(made: tuple[str, Path]) -> None:
    data, path = made
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=7)
    batches = list(stream.loader(num_workers=1, pin_memory=True))
    assert sum(len(b[1]) for b in batches) == N_ROWS
    if torch.cuda.is_available():  # pinned only where there is a device to pin for
        assert all(t.is_pinned() for b in batches for t in b)


@pytest.mark.parametrize("world", [2, 3])
def test_loader_gives_every_rank_the_same_steps(made: tuple[str, Path], world: int) -> None:
    data, path = made
    runs = []
    for rank in range(world):
        stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=4, rank=rank,
                                   world_size=world)
        stream.set_epoch(1)
        runs.append([b[1].tolist() + b[0].flatten(1)[:, 0].tolist()
                     for b in stream.loader(num_workers=2)])
    assert len({len(r) for r in runs}) == 1
    firsts = [v for r in runs for b in r for v in b[len(b) // 2:]]
    assert len(set(firsts)) == len(firsts) >= N_ROWS - world * CHUNK  # disjoint, drop < a block


# --- damage: training refuses it, names the block, writes nothing -----------------------------

def _flip_byte(path: Path, name: str, chunk: tuple[int, ...]) -> None:
    if path.suffix == ".zarr":
        target, offset = path.joinpath(name, "c", *map(str, chunk)), None
    else:
        import h5py

        with h5py.File(path, "r") as f:
            ds = f[name]
            info = ds.id.get_chunk_info_by_coord(tuple(c * s for c, s in zip(chunk, ds.chunks)))
        target, offset = path, info.byte_offset + info.size // 2
    raw = bytearray(target.read_bytes())
    offset = len(raw) // 2 if offset is None else offset
    raw[offset] ^= 0x10
    target.write_bytes(bytes(raw))


def _damage(path: Path, how: str) -> int:
    """Damage block 2 of a dense set (rows 32-47); returns the block."""
    if how == "flip probs":
        _flip_byte(path, S.PROBS, (1, 2, 0))
    elif how == "flip labels":
        _flip_byte(path, S.LABELS, (2,))
    elif how == "delete probs":
        path.joinpath(S.PROBS, "c", "1", "2", "0").unlink()
    elif how == "delete labels":
        path.joinpath(S.LABELS, "c", "2").unlink()
    return 2


DAMAGE = [(suffix, how) for suffix in ("zarr", "h5") for how in ("flip probs", "flip labels")]
DAMAGE += [("zarr", "delete probs"), ("zarr", "delete labels")]  # HDF5 chunks cannot be deleted


def _damaged(tmp_path: Path, suffix: str, how: str) -> tuple[str, Path, int]:
    data = make_npz(tmp_path / "data.npz")
    path = tmp_path / f"set.{suffix}"
    precompute(data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return data, path, _damage(path, how)


@pytest.mark.parametrize("suffix, how", DAMAGE)
def test_train_refuses_a_damaged_set_in_one_line(tmp_path: Path, suffix: str, how: str) -> None:
    data, path, block = _damaged(tmp_path, suffix, how)
    out = tmp_path / "s.pt"
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-8-3",
                                      "--out", str(out), "--transfer-set", str(path),
                                      "--temperature", "4", "--epochs", "1"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"block {block} " in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() and not Path(f"{out}.state").exists()


@pytest.mark.parametrize("suffix, how", DAMAGE)
def test_streamed_training_refuses_a_damaged_set(tmp_path: Path, suffix: str, how: str) -> None:
    data, path, block = _damaged(tmp_path, suffix, how)
    out = tmp_path / "s.pt"
    with pytest.raises(IntegrityError, match=f"block {block} "):
        train_student(data, "mlp:16-8-3", transfer_set=path, temperature=4.0, epochs=1,
                      batch_size=8, stream=True, out=out)
    assert not out.exists()


@pytest.fixture
def dense(npz_data: str, out_path: Path) -> tuple[str, Path]:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return npz_data, out_path


def test_non_finite_targets_are_refused_even_with_a_matching_checksum(
        dense: tuple[str, Path]) -> None:
    data, path = dense
    from softlabels.format.backends import open_store

    with open_store(path, "r+") as store:
        probs = store.read(S.PROBS)
        probs[1, 70, 0] = np.inf  # block 4
        store.write(S.PROBS, slice(None), probs)
    forge_checksums(path, 4)
    for stream in (False, True):
        with pytest.raises(IntegrityError, match="block 4 .*NaN or inf"):
            train_student(data, "mlp:16-8-3", transfer_set=path, temperature=4.0, epochs=1,
                          stream=stream)


def test_streamed_and_in_memory_training_agree_on_a_whole_epoch(dense: tuple[str, Path]) -> None:
    """Both plans see every row once with the same targets: the same loss at the initial
    weights, whatever the order (lr near zero keeps the weights put)."""
    data, path = dense
    kwargs = dict(transfer_set=path, temperature=4.0, epochs=1, batch_size=N_ROWS, lr=1e-12)
    a = train_student(data, "mlp:16-8-3", stream=False, **kwargs)
    b = train_student(data, "mlp:16-8-3", stream=True, **kwargs)
    assert a.rows == b.rows == N_ROWS
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-5)


def test_without_checksums_value_checks_still_refuse_a_missing_chunk(tmp_path: Path) -> None:
    data, path, block = _damaged(tmp_path, "zarr", "delete probs")  # reads back as NaN
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=8, checksum=False)
    with pytest.raises(IntegrityError, match=f"block {block} .*NaN or inf in 'probs'"):
        list(stream)


def test_an_index_outside_the_dataset_is_refused_not_served(dense: tuple[str, Path]) -> None:
    """A set whose `index` points past the dataset (checksums forged to match) must not serve
    another example's input, nor fail with a bare IndexError."""
    data, path = dense
    from softlabels.format.backends import open_store

    with open_store(path, "r+") as store:
        index = store.read(S.INDEX)
        index[70] = N_ROWS + 5  # block 4
        store.write(S.INDEX, slice(None), index)
    forge_checksums(path, 4)
    stream = SoftTargetBatches(data, path, temperature=4.0, batch_size=8, check=False)
    with pytest.raises(IntegrityError, match="block 4 .*dataset indices outside"):
        for _ in stream:
            pass
    with pytest.raises(IntegrityError, match="block 4 .*dataset indices outside"):
        for _ in stream.loader(num_workers=1):
            pass
    for how in ([], ["--stream"]):
        result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-8-3",
                                          "--out", str(path.parent / "s.pt"), "--transfer-set",
                                          str(path), "--temperature", "4", "--epochs", "1", *how])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1, result.stderr
        assert "block 4 " in lines[0] and "dataset indices outside" in lines[0]


@pytest.mark.parametrize("iterators", [1, 3])
def test_a_stream_left_open_at_exit_ends_quietly(dense: tuple[str, Path], iterators: int,
                                                 ) -> None:
    """A script that stops reading mid-epoch and exits (streams still open, their read-ahead
    threads parked) exits cleanly, without an 'Exception ignored' traceback from the thread
    pool torn down with the interpreter, nor from a generator closed once the modules'
    globals are gone (several iterators held in a list are closed that late)."""
    import subprocess
    import sys

    data, path = dense
    script = ("import sys\nimport softlabels.train.stream_pieces as sp\n"
              "sp.PIECE_ROWS = 8  # pieces of one batch: producers parked on full queues\n"
              "from softlabels.train.datasets import SoftTargetBatches\n"
              f"stream = SoftTargetBatches({data!r}, {str(path)!r}, temperature=4.0, "
              f"batch_size=8, window=1)\nits = [iter(stream) for _ in range({iterators})]\n"
              "for it in its:\n    next(it)\nprint('read one')\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "read one", done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_producers_are_stopped_before_exit_handlers_registered_earlier(
        dense: tuple[str, Path]) -> None:
    """atexit runs the last registered handler first. A library imported after the stream's
    module registers its handler later (h5py's, imported when an HDF5 set is opened, removes
    the type converters a read in flight uses: under load the process crashed at exit in CI).
    The producers are stopped before any handler registered before they started."""
    import subprocess
    import sys

    data, path = dense
    script = ("import atexit, sys\nimport softlabels.train.stream_pieces as sp\n"
              "atexit.register(lambda: print('stopped before:', all(not t.is_alive() "
              "for t in list(sp._RUNNING))))\n"
              "from softlabels.train.datasets import SoftTargetBatches\n"
              f"stream = SoftTargetBatches({data!r}, {str(path)!r}, temperature=4.0, "
              "batch_size=8, window=1)\nit = iter(stream)\nnext(it)\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped before: True", done.stdout

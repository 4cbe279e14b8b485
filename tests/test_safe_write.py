"""No write follows a link: for every writer, a symbolic link planted where it writes (the file,
its temporary, a folder the cache writes into) is refused in one line and the file it points to
is left as it was."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.errors import UnsafePathError
from softlabels.safe_write import OutputWriteError, atomic_write, write_text
from softlabels.teachers.models import build_model, save_checkpoint

VICTIM = b"not yours to overwrite\n"


def plant(link: Path, victim: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)


def _checkpoint(tmp: Path, at: str) -> Callable[[], None]:
    out = tmp / "out" / "model.pt"
    plant(out.parent / at, tmp / "victim")
    return lambda: save_checkpoint(build_model("mlp:16-3"), out, spec="mlp:16-3")


def _state(tmp: Path, at: str) -> Callable[[], None]:
    from softlabels.train.resume import save_state

    out = tmp / "out" / "model.pt"
    plant(out.parent / at, tmp / "victim")
    net = build_model("mlp:16-3")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return lambda: save_state(out, digest="d", epoch=1, history=[], model=net, optimizer=opt,
                              generator=torch.Generator())


def _report(tmp: Path, at: str) -> Callable[[], None]:
    from softlabels.compute.blocks import precompute
    from softlabels.sets.report import transfer_set_report

    data = make_npz(tmp / "d.npz")
    precompute(data, ["mlp:16-3"], tmp / "s.zarr", temperatures=[1.0, 4.0], random_teacher=True)
    plant(tmp / "rep" / at, tmp / "victim")
    return lambda: transfer_set_report(tmp / "s.zarr", tmp / "rep")


def _pipeline_progress(tmp: Path, at: str) -> Callable[[], None]:
    from softlabels.experiments.pipeline import Steps

    steps = Steps(tmp / "run", lambda s: None)
    plant(steps.file.parent / at.replace("FILE", steps.file.name), tmp / "victim")
    return lambda: steps.run("a", {}, lambda: 1)


def _sequences(tmp: Path, at: str) -> Callable[[], None]:
    from softlabels.experiments.tiny_lm import write_sequences

    plant(tmp / at, tmp / "victim")
    return lambda: write_sequences(b"abcdefgh", tmp / "seq.jsonl", 3)


def _results(tmp: Path, at: str) -> Callable[[], None]:
    plant(tmp / at, tmp / "victim")
    return lambda: write_text(tmp / "results.md", "# results\n")


WRITERS = [
    ("checkpoint", _checkpoint, "model.pt"),
    ("checkpoint temporary", _checkpoint, "model.pt.tmp"),
    ("training state", _state, "model.pt.state"),
    ("training state temporary", _state, "model.pt.state.tmp"),
    ("report summary", _report, "summary.md"),
    ("report plot", _report, "confidence_entropy.png"),
    ("report plot temporary", _report, "class_mass.png.tmp"),
    ("pipeline progress", _pipeline_progress, "FILE"),
    ("pipeline progress temporary", _pipeline_progress, "FILE.tmp"),
    ("sequence file", _sequences, "seq.jsonl"),
    ("results", _results, "results.md.tmp"),
]


@pytest.mark.parametrize("name,make,at", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path: Path, name: str,
                                                            make: Callable, at: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    write = make(tmp_path, at)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        write()
    assert victim.read_bytes() == VICTIM
    links = [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert links, "the planted link is left for the user to see"


def test_a_dangling_link_at_the_temporary_is_refused_and_nothing_is_created(
        tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "new"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "x.tmp").symlink_to(target)
    with pytest.raises(UnsafePathError):
        write_text(tmp_path / "x", "hello")
    assert not target.exists() and not (tmp_path / "x").exists()


def test_a_stale_regular_temporary_is_replaced_and_the_write_is_atomic(tmp_path: Path) -> None:
    (tmp_path / "x.tmp").write_text("torn")
    (tmp_path / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "x", "w") as f:
        f.write("new")
        raise RuntimeError("killed")
    assert (tmp_path / "x").read_text() == "old" and not (tmp_path / "x.tmp").exists()
    write_text(tmp_path / "x", "new")
    assert (tmp_path / "x").read_text() == "new" and not (tmp_path / "x.tmp").exists()


def test_a_full_disk_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "model.pt"
    with pytest.raises(OutputWriteError, match=rf"cannot write {out}.*No space left.*free"):
        save_checkpoint(build_model("mlp:16-3"), out, spec="mlp:16-3")
    monkeypatch.setattr(os, "fsync", real)
    assert not out.exists() and not Path(f"{out}.tmp").exists()


def test_train_refuses_a_link_at_its_temporary_in_one_line(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    (tmp_path / "m.pt.state.tmp").symlink_to(victim)
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-3", "--out",
                                      str(tmp_path / "m.pt"), "--epochs", "1"])
    assert result.exit_code != 0
    assert "symbolic link" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert victim.read_bytes() == VICTIM


def _remote_store() -> object:
    import zarr
    from zarr.storage import MemoryStore

    store = MemoryStore()
    zarr.create_array(store, name="a", shape=(7,), chunks=(3,), dtype="f4", fill_value=0)[:] = 1
    return store


def test_the_chunk_cache_refuses_a_planted_set_folder(tmp_path: Path) -> None:
    import hashlib

    from softlabels.format.chunk_cache import prepare

    url = "s3://bucket/set.zarr"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashlib.sha256(url.encode()).hexdigest()[:16]).symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        prepare(str(cache), url, b"{}")
    assert not any(elsewhere.iterdir())


def test_the_chunk_cache_does_not_write_through_a_link_inside_its_folder(
        tmp_path: Path) -> None:
    import asyncio

    from zarr.core.buffer import default_buffer_prototype

    from softlabels.format.chunk_cache import bounded_cache_store, prepare

    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder, room = prepare(str(cache), "s3://bucket/set.zarr", b"{}")
    (Path(folder) / "a").symlink_to(elsewhere)  # where the chunks of array `a` would go
    store = bounded_cache_store(_remote_store(), str(cache), folder, room)
    got = asyncio.run(store.get("a/c/0", default_buffer_prototype()))
    assert got is not None  # read from the remote, uncached
    assert not any(elsewhere.iterdir())
    got = asyncio.run(store.get("a/zarr.json", default_buffer_prototype()))
    assert got is not None and not any(elsewhere.iterdir())

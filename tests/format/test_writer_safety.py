"""What a writer may touch: --overwrite removes only transfer sets, writes never follow links out
of the set, a resume never mixes two datasets, and the writer lease admits one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CHUNK, ROOT, make_npz
from softlabels.compute.blocks import precompute
from softlabels.errors import MismatchError, SoftlabelsError, TransferSetError, WriterBusyError
from softlabels.format import convert
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.lease import WriterLease, holder, lock_path
from softlabels.format.reader import open_transfer_set

TEACHER = ["mlp:16-8-3"]


def interrupt(path: Path, blocks: list[int]) -> None:
    """Make `path` look like a run killed with `blocks` unwritten."""
    with open_store(path, "r+") as store:
        done = store.read(S.BLOCK_DONE)
        done[blocks] = 0
        store.write(S.BLOCK_DONE, slice(None), done)
        store.set_meta({**store.get_meta(), "status": S.STATUS_WRITING})


# --- --overwrite ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["notes.txt", "notes.h5", "notes.zarr"])
def test_overwrite_never_deletes_an_ordinary_file(npz_data: str, tmp_path: Path,
                                                  name: str) -> None:
    target = tmp_path / name
    target.write_text("my notes")
    with pytest.raises(TransferSetError, match="not a softlabels transfer set"):
        precompute(npz_data, TEACHER, target, overwrite=True, random_teacher=True)
    assert target.read_text() == "my notes"


def test_overwrite_never_deletes_a_directory_that_is_not_a_set(npz_data: str,
                                                               tmp_path: Path) -> None:
    plain, group = tmp_path / "plain.zarr", tmp_path / "group.zarr"
    plain.mkdir()
    (plain / "keep.txt").write_text("x")
    import zarr

    zarr.open_group(str(group), mode="w").create_array("mine", shape=(3,), dtype="int8")
    for target in (plain, group):  # a Zarr group of someone else's is not a set either
        with pytest.raises(TransferSetError, match="refusing --overwrite"):
            precompute(npz_data, TEACHER, target, overwrite=True, random_teacher=True)
    assert (plain / "keep.txt").exists() and (group / "mine").is_dir()
    h5 = tmp_path / "other.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(TransferSetError, match="not a softlabels transfer set"):
        precompute(npz_data, TEACHER, h5, overwrite=True, random_teacher=True)
    with h5py.File(h5, "r") as f:
        assert f["data"][:].tolist() == [0, 1, 2]


def test_overwrite_refuses_a_symlink_and_leaves_its_target(npz_data: str, out_path: Path,
                                                           tmp_path: Path) -> None:
    precompute(npz_data, TEACHER, out_path, chunk_rows=CHUNK, random_teacher=True)
    link = tmp_path / f"link{out_path.suffix}"
    link.symlink_to(out_path)
    with pytest.raises(TransferSetError, match="symbolic link"):
        precompute(npz_data, ["mlp:16-5-3"], link, overwrite=True, random_teacher=True)
    with open_transfer_set(out_path) as ts:
        assert ts.meta["teacher"]["members"][0]["spec"] == "mlp:16-8-3"


def test_overwrite_replaces_a_partial_set_and_an_empty_directory(npz_data: str,
                                                                 out_path: Path,
                                                                 tmp_path: Path) -> None:
    precompute(npz_data, TEACHER, out_path, chunk_rows=CHUNK, random_teacher=True)
    interrupt(out_path, [1, 2])
    precompute(npz_data, ["mlp:16-5-3"], out_path, chunk_rows=CHUNK, overwrite=True,
               random_teacher=True)
    with open_transfer_set(out_path) as ts:
        assert ts.meta["teacher"]["members"][0]["spec"] == "mlp:16-5-3"
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    precompute(npz_data, TEACHER, empty, chunk_rows=CHUNK, overwrite=True, random_teacher=True)
    open_transfer_set(empty).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data.npz", "empty.zarr", out_path.name])  # nothing left beside the outputs


@pytest.mark.parametrize("suffix", [".partial", ".creating", ".removing", ".packing"])
def test_a_users_file_at_a_staging_name_is_never_removed(npz_data: str, tmp_path: Path,
                                                         suffix: str) -> None:
    src = tmp_path / "s.zarr"
    precompute(npz_data, TEACHER, src, chunk_rows=CHUNK, random_teacher=True)
    for out in (tmp_path / "p.zarr", tmp_path / "c.zarr.zip"):
        mine = out.with_name(out.name + suffix)
        mine.write_text("not softlabels'")
        with pytest.raises(TransferSetError, match="in the way .* move it"):
            if out.name.endswith(".zip"):
                convert(src, out)
            else:
                precompute(npz_data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
        assert mine.read_text() == "not softlabels'" and not out.exists()


# --- links out of the set ------------------------------------------------------------------

@pytest.mark.parametrize("what", ["chunk", "array"])
def test_resume_never_writes_through_a_symlink(npz_data: str, tmp_path: Path,
                                               what: str) -> None:
    out, outside = tmp_path / "s.zarr", tmp_path / "outside"
    precompute(npz_data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
    interrupt(out, [2])
    if what == "chunk":  # the chunk of a block the resume would rewrite
        outside.mkdir()
        victim = outside / "precious"
        (out / S.LOGITS / "c" / "2" / "0").rename(victim)
        (out / S.LOGITS / "c" / "2" / "0").symlink_to(victim)
    else:  # a whole array directory
        (out / S.LOGITS).rename(outside)
        (out / S.LOGITS).symlink_to(outside)
        victim = outside / "c" / "2" / "0"
    before = victim.read_bytes()
    with pytest.raises(TransferSetError, match="link that leads out of the set"):
        precompute(npz_data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
    assert victim.read_bytes() == before
    precompute(npz_data, TEACHER, out, chunk_rows=CHUNK, overwrite=True,
               random_teacher=True)  # removes the link
    assert victim.read_bytes() == before
    open_transfer_set(out).close()


def test_resume_refuses_an_hdf5_file_with_links(npz_data: str, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    precompute(npz_data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
    interrupt(out, [2])
    os.link(out, tmp_path / "hard.h5")  # a write would change the other name's file too
    with pytest.raises(TransferSetError, match="hard links"):
        precompute(npz_data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)


# --- resume proves its rows ----------------------------------------------------------------

def test_resume_after_data_changed_outside_the_probe_is_refused(tmp_path: Path,
                                                                suffix: str) -> None:
    path = tmp_path / "d.npz"
    data = make_npz(path)
    out = tmp_path / f"s.{suffix}"
    precompute(data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
    interrupt(out, [4])
    original = dict(np.load(path))
    arrays = {k: v.copy() for k, v in original.items()}
    arrays["x"][1] += 1  # example 1: not among the 16 the identity probe looks at
    np.savez(path, **arrays)
    with pytest.raises(MismatchError, match="other data: row 1 "):
        precompute(data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
    with pytest.raises(SoftlabelsError, match="incomplete"):
        open_transfer_set(out)  # still not presented as complete
    np.savez(path, **original)  # the original data resumes
    result = precompute(data, TEACHER, out, chunk_rows=CHUNK, random_teacher=True)
    assert result.resumed and result.rows_computed == CHUNK


def test_resume_of_a_view_set_checks_the_examples(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    data = make_npz(path, n=40)
    out = tmp_path / "v.zarr"
    args = dict(chunk_rows=CHUNK, views=2, augment="hflip")
    precompute(data, TEACHER, out, **args, random_teacher=True)
    interrupt(out, [4])
    assert precompute(data, TEACHER, out, **args, random_teacher=True).resumed  # same data: fine
    interrupt(out, [4])
    arrays = dict(np.load(path))
    arrays["x"][3] *= 2  # rows 6 and 7 (its two views)
    np.savez(path, **arrays)
    with pytest.raises(MismatchError, match="row 6 "):
        precompute(data, TEACHER, out, **args, random_teacher=True)


# --- the lease -----------------------------------------------------------------------------

def _hold(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from softlabels.format.lease import WriterLease; "
            f"WriterLease({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lease_refuses_a_second_process_and_nests_in_one(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    with WriterLease(out), WriterLease(out):  # the same process may take it again
        assert holder(out) == "this process"
    assert not lock_path(out).exists() and holder(out) is None
    other = _hold(out)
    try:
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == other.pid and info["host"] and info["started_at"]
        with pytest.raises(WriterBusyError, match=f"being written by pid {other.pid} on "):
            WriterLease(out).acquire()
    finally:
        other.kill()
        other.wait()
    with WriterLease(out):  # the holder is gone: taken over, no manual step
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_lease_can_be_turned_off_for_filesystems_without_locks(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    monkeypatch.setenv("SOFTLABELS_USE_FILE_LOCKING", "FALSE")
    with WriterLease(tmp_path / "s.zarr"):
        assert not lock_path(tmp_path / "s.zarr").exists()


TAKE = """
import os, sys
from softlabels.errors import SoftlabelsError
from softlabels.format.lease import WriterLease
if sys.argv[2] == "nobody":  # root: another user from here on (the interpreter is root's)
    os.setgid(65534)
    os.setuid(65534)
try:
    lease = WriterLease(sys.argv[1]).acquire()
except SoftlabelsError as exc:
    print(exc)
    sys.exit(1)
print("taken")
lease.release()
"""


def test_another_users_lease_is_refused_while_held_and_taken_over_once_stale() -> None:
    """A lease file this user cannot write (another user's; as root the taker runs as nobody,
    otherwise the file is made read-only): refused naming its holder while held, taken over
    once its holder is gone, instead of 'permission denied'."""
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="softlabels-lease-"))  # outside root-only folders
    try:
        shared.chmod(0o777)
        out = shared / "s.zarr"
        other = _hold(out)
        who = "nobody" if os.geteuid() == 0 else "me"
        if who == "me":
            lock_path(out).chmod(0o444)

        def take() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", TAKE, str(out), who], cwd=shared,
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ,
                                       "PYTHONPATH": str(ROOT)})
        try:
            held = take()
            assert held.returncode == 1, held.stdout + held.stderr
            assert f"being written by pid {other.pid} on " in held.stdout, held.stdout
        finally:
            other.kill()
            other.wait()
        taken = take()
        assert taken.returncode == 0 and taken.stdout.strip() == "taken", \
            taken.stdout + taken.stderr
        assert not lock_path(out).exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)

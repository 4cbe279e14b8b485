"""Fault injection: writers killed at exact points, damaged arrays, edited metadata, two writers.

Whatever happens, nothing is presented as complete and valid when it is not: either the reader
refuses it, or `verify` fails it, or it is exactly the output the command makes when left alone.
A rerun of the killed command finishes the job and leaves nothing stray beside the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import ROOT, TESTS, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError, SoftlabelsError
from softlabels.format import convert, merge, subset
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
CHUNK = 16
DAMAGED_BLOCK = 2  # rows 32-47


def cli_run(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout + r.stderr


def presented_valid(path: Path) -> bool:
    """True when the reader opens `path` as complete and `verify` passes it."""
    try:
        open_transfer_set(path).close()
    except SoftlabelsError:
        return False
    return verify(path).ok


def assert_same_set(a: Path, b: Path) -> None:
    with open_transfer_set(a) as x, open_transfer_set(b) as y:
        assert x.row_arrays() == y.row_arrays()
        for name in x.row_arrays():
            np.testing.assert_array_equal(x.read(name), y.read(name), err_msg=name)
        for key in ("teacher", "dataset", "temperatures", "num_rows", "provenance"):
            if key == "provenance":  # names the output's own source paths only
                continue
            assert x.meta[key] == y.meta[key], key


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Two sets of the same data: an ensemble with member logits and stored inputs, one more
    teacher; and a top-k set of augmented views (the other array kinds)."""
    root = tmp_path_factory.mktemp("sources")
    data = make_npz(root / "d.npz")
    a, b, k = root / "a.zarr", root / "b.zarr", root / "k.zarr"
    precompute(data, ["mlp:16-8-3", "mlp:16-6-3"], a, temperatures=[1, 4], chunk_rows=CHUNK,
               keep_members=True, store_inputs=True, random_teacher=True)
    precompute(data, ["mlp:16-5-3"], b, temperatures=[1, 4], chunk_rows=CHUNK, random_teacher=True)
    precompute(data, ["mlp:16-8-3"], k, temperatures=[1, 4], chunk_rows=CHUNK, topk=2,
               views=2, augment="hflip", random_teacher=True)
    convert(a, root / "a.h5")
    return {"data": data, "a": a, "b": b, "k": k, "a.h5": root / "a.h5"}


# --- kills at exact points -------------------------------------------------------------------

def _commands(src: dict[str, Path | str]) -> dict[str, list[str]]:
    return {
        "precompute": ["precompute", "--data", src["data"], "--teacher", "mlp:16-8-3",
                       "--teacher", "mlp:16-6-3", "--keep-members", "--temperatures", "1,4",
                       "--chunk-rows", str(CHUNK), "--random-teacher"],
        "precompute --overwrite": ["precompute", "--data", src["data"], "--teacher",
                                   "mlp:16-8-3", "--temperatures", "1,4", "--chunk-rows",
                                   str(CHUNK), "--overwrite", "--random-teacher"],
        # a killed run's forked DataLoader workers must not keep its lease: the rerun right
        # after works
        "precompute --num-workers": ["precompute", "--data", src["data"], "--teacher",
                                     "mlp:16-8-3", "--temperatures", "1,4", "--chunk-rows",
                                     str(CHUNK), "--num-workers", "2", "--random-teacher"],
        "merge": ["merge", src["a"], src["b"]],
        "convert": ["convert", src["a"]],
        "subset": ["subset", src["a"], "--fraction", "0.5", "--seed", "3"],
    }


STORE = "softlabels.format.store"
KILLS = [  # (command, output name, kill target, nth call, before/after)
    ("precompute", "p.zarr", f"{STORE}:Store.create", 3, "before"),  # laying out
    ("precompute", "p.h5", f"{STORE}:Store.create", 3, "before"),
    ("precompute", "p.zarr", "softlabels.format.writer:write_block", 3, "before"),
    ("precompute", "p.h5", "softlabels.format.writer:write_block", 3, "before"),
    ("precompute", "p.zarr", f"{STORE}:Store.flush", 4, "before"),  # data in, not marked done
    ("precompute", "p.zarr", "os:write", 17, "after"),  # a block's chunk written, not renamed
    ("precompute", "p.h5", "softlabels.format._hdf5:HDF5Store.flush", 4, "before"),
    ("precompute", "p.zarr", "softlabels.format.writer:TransferSetWriter.finish", 1, "after"),
    ("precompute --num-workers", "p.zarr", "softlabels.format.writer:write_block", 2, "before"),
    ("precompute --overwrite", "p.zarr", "softlabels.format.aside:_delete", 2, "before"),
    ("precompute --overwrite", "p.h5", "os:rename", 1, "after"),
    ("convert", "c.h5", "softlabels.format.writer:write_block", 3, "before"),
    ("convert", "c.zarr", "softlabels.format.writer:TransferSetWriter.finish", 1, "after"),
    ("convert", "c.h5", "softlabels.format.copying:publish", 1, "before"),
    ("convert", "c.zarr.zip", "zipfile:ZipFile.write", 5, "before"),  # packing the zip
    ("convert", "c.zarr.zip", "softlabels.format.copying:remove_set", 1, "after"),
    ("convert", "c.zarr.zip", "softlabels.format.copying:publish", 1, "after"),
    ("merge", "m.zarr", "softlabels.format.writer:write_block", 2, "before"),
    ("merge", "m.h5", "softlabels.format.copying:publish", 1, "before"),
    ("subset", "s.zarr", "softlabels.format.writer:write_block", 1, "before"),
    ("subset", "s.h5", "softlabels.format.copying:publish", 1, "after"),
]


@pytest.mark.parametrize("command, name, target, n, when", KILLS,
                         ids=[f"{c}-{o}-{t.split(':')[1]}#{n}{w[0]}" for c, o, t, n, w in KILLS])
def test_killed_writer_is_never_presented_complete_and_rerun_finishes(
        sources: dict[str, Path | str], tmp_path: Path, command: str, name: str, target: str,
        n: int, when: str) -> None:
    args = _commands(sources)[command]
    ref, out = tmp_path / "ref" / name, tmp_path / "out" / name
    ref.parent.mkdir()
    out.parent.mkdir()
    code, text = cli_run([*args, "--out", ref])
    assert code == 0, text
    if command.endswith("--overwrite"):  # an older set the command replaces
        precompute(sources["data"], ["mlp:16-5-3"], out, chunk_rows=CHUNK, random_teacher=True)

    killed = subprocess.run([sys.executable, str(TESTS / "faultpoints.py"), target, str(n), when,
                             "--", *map(str, args), "--out", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died where we meant
    if out.exists() and presented_valid(out):
        assert_same_set(out, ref)  # only the finished result may look finished
    staged = out.with_name(out.name + ".partial")
    if staged.exists() and not presented_valid(staged):  # says what to do, in one line
        with pytest.raises(SoftlabelsError, match="rerun that same command") as err:
            open_transfer_set(staged)
        assert "\n" not in str(err.value)

    code, text = cli_run([*args, "--out", out])
    finished_before = command in ("merge", "convert", "subset") and "publish" in target \
        and when == "after"
    if finished_before:  # the kill came after the output appeared, complete: a rerun says so
        assert code == 0 and "already complete" in text, text
    else:
        assert code == 0, text
    assert presented_valid(out)
    assert_same_set(out, ref)
    assert sorted(os.listdir(out.parent)) == [name], "a stray file beside the output"


# --- damaged arrays --------------------------------------------------------------------------

def _chunk_file(path: Path, name: str, block: int) -> Path:
    arr = zarr.open_array(path / name, mode="r")
    coords = [0] * arr.ndim
    coords[S.row_axis(name)] = block
    return path / name / arr.metadata.encode_chunk_key(tuple(coords))


def _damage(path: Path, name: str, how: str) -> None:
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            ds = f[name]
            offset = [0] * ds.ndim
            offset[S.row_axis(name)] = DAMAGED_BLOCK * ds.chunks[S.row_axis(name)]
            info = ds.id.get_chunk_info_by_coord(tuple(offset))
        with open(path, "r+b") as fh:
            fh.seek(info.byte_offset + info.size // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return
    chunk = _chunk_file(path, name, DAMAGED_BLOCK)
    raw = chunk.read_bytes()
    if how == "flip":
        i = len(raw) // 2
        chunk.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    elif how == "truncate":
        chunk.write_bytes(raw[:len(raw) // 2])
    else:
        chunk.unlink()


DENSE = [S.LOGITS, S.PROBS, S.MEMBER_LOGITS, S.LABELS, S.INDEX, S.SAMPLE_HASH, S.INPUTS]
SPARSE = [S.TOPK_INDICES, S.TOPK_LOGITS, S.TOPK_LOGSUMEXP, S.VIEW_SEED]
DAMAGES = ([("a", n, how) for n in DENSE for how in ("flip", "truncate", "delete")]
           + [("k", n, how) for n in SPARSE for how in ("flip", "truncate", "delete")]
           + [("a.h5", n, "flip") for n in DENSE])


@pytest.mark.parametrize("kind, name, how", DAMAGES,
                         ids=[f"{k}-{n}-{h}" for k, n, h in DAMAGES])
def test_damaged_array_is_refused_everywhere_and_never_copied(
        sources: dict[str, Path | str], tmp_path: Path, kind: str, name: str, how: str) -> None:
    src = Path(sources[kind])
    bad = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, bad)
    _damage(bad, name, how)

    assert not verify(bad).ok
    with open_transfer_set(bad) as ts:
        ts.read_block(DAMAGED_BLOCK - 1)  # the neighbours stay readable
        with pytest.raises(IntegrityError, match=f"block {DAMAGED_BLOCK} "):
            ts.read_block(DAMAGED_BLOCK)
    outs = tmp_path / "outs"
    outs.mkdir()
    operations = [("convert", lambda: convert(bad, outs / "c.h5")),
                  ("subset", lambda: subset(bad, outs / "s.zarr", fraction=1.0))]
    if kind != "k":  # merge takes dense sets
        operations.append(("merge", lambda: merge([sources["b"], bad], outs / "m.zarr")))
    for what, operation in operations:
        with pytest.raises(IntegrityError, match=f"block {DAMAGED_BLOCK} ") as err:
            operation()
        assert "\n" not in str(err.value), what
        assert os.listdir(outs) == [], f"{what} left {os.listdir(outs)}"


def test_damage_through_the_cli_is_one_line_and_leaves_nothing(
        sources: dict[str, Path | str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(sources["a"], bad)
    _damage(bad, S.PROBS, "flip")
    for args in (["convert", bad, "--out", tmp_path / "o" / "c.zarr.zip"],
                 ["subset", bad, "--out", tmp_path / "o" / "s.h5", "--fraction", "1"],
                 ["merge", sources["b"], bad, "--out", tmp_path / "o" / "m.zarr"]):
        (tmp_path / "o").mkdir(exist_ok=True)
        code, text = cli_run(args)
        assert code == 1 and text.count("\n") == 1, text
        assert f"block {DAMAGED_BLOCK} (rows 32-47)" in text and "Traceback" not in text
        assert os.listdir(tmp_path / "o") == []


# --- edited metadata -------------------------------------------------------------------------

def _edit_meta(path: Path, edit: dict[str, object]) -> None:
    with open_store(path, "r+") as store:
        meta = store.get_meta()
        for key, value in edit.items():
            target = meta
            *parents, last = key.split(".")
            for p in parents:
                target = target[p]
            target[last] = value
        store.set_meta(meta)


EDITS = [
    {"status": "writing"},
    {"format_version": 1},  # a version 1 set holds other checksums than this one
    {"format_version": 3},
    {"num_rows": 50},
    {"num_classes": 4},
    {"num_examples": 50},
    {"dataset.fingerprint": "0" * 64},
    {"dtype": "float32"},
    {"sparse": {"kind": "topk", "k": 2}},
    {"temperatures": [1, 5]},
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: ",".join(e))
def test_edited_metadata_is_never_presented_valid(sources: dict[str, Path | str],
                                                  tmp_path: Path, edit: dict) -> None:
    bad = tmp_path / "a.zarr"
    shutil.copytree(sources["a"], bad)
    _edit_meta(bad, edit)
    assert not presented_valid(bad)


def test_edited_bookkeeping_is_never_presented_valid(sources: dict[str, Path | str],
                                                     tmp_path: Path) -> None:
    bad = tmp_path / "a.zarr"
    shutil.copytree(sources["a"], bad)
    with open_store(bad, "r+") as store:
        sums = store.read(S.ARRAY_CHECKSUM)
        sums[3, 1] ^= np.uint64(1)
        store.write(S.ARRAY_CHECKSUM, slice(None), sums)
    assert not presented_valid(bad)
    shutil.rmtree(bad / S.PROBS)  # a whole array gone
    assert not presented_valid(bad)


# --- two writers -----------------------------------------------------------------------------

def _slow_precompute(data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "softlabels", "precompute", "--data", data, "--teacher",
            "python:helpers:slow", "--out", str(out), "--temperatures", "1,3", "--chunk-rows",
            "16", "--batch-size", "8", "--dtype", "float32", *extra, "--random-teacher"]


def _wait_for_lease(out: Path, proc: subprocess.Popen) -> dict:
    lock = out.with_name(out.name + ".lock")
    for _ in range(3000):
        if lock.exists() and lock.read_text().strip():
            return json.loads(lock.read_text())
        assert proc.poll() is None, proc.communicate()
        import time

        time.sleep(0.01)
    raise AssertionError("the first writer never took its lease")


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_second_writer_is_refused_naming_the_first(tmp_path: Path, suffix: str,
                                                   sources: dict[str, Path | str]) -> None:
    data = make_npz(tmp_path / "d.npz", n=300)
    out = tmp_path / f"set.{suffix}"
    gate = tmp_path / "gate"  # the first writer waits at its first batch while this exists
    gate.touch()
    env = {**ENV, "SOFTLABELS_TEST_DELAY": "0", "SOFTLABELS_TEST_GATE": str(gate)}
    first = subprocess.Popen(_slow_precompute(data, out), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        holder = _wait_for_lease(out, first)
        assert holder["pid"] == first.pid
        second = subprocess.run(_slow_precompute(data, out, "--overwrite"), env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert f"being written by pid {first.pid}" in second.stderr, second.stderr
        assert second.stderr.count("\n") == 1 and "--overwrite" not in second.stderr
        # the sharing commands and the cluster driver are refused the same way
        for args in (["convert", sources["b"], "--out", out],
                     ["merge", sources["a"], sources["b"], "--out", out],
                     ["subset", sources["b"], "--out", out, "--fraction", "0.5"],
                     *([["precompute", "--data", data, "--teacher", "mlp:16-3", "--out", out,
                         "--workers", "1",
                         "--random-teacher"]] if suffix == "zarr" else [])):  # cluster: Zarr
            code, text = cli_run(args)
            assert code == 1 and f"pid {first.pid}" in text, (args, text)
        code, text = cli_run(["info", out])  # a reader is told to wait, not to rerun
        assert code == 1 and f"being written by pid {first.pid}" in text, text
        assert first.poll() is None  # all of that happened while the first one was writing
        gate.unlink()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert presented_valid(out)
    assert not out.with_name(out.name + ".lock").exists()


@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_lease_of_a_killed_writer_is_taken_over(tmp_path: Path, suffix: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=300)
    out = tmp_path / f"set.{suffix}"
    env = {**ENV, "SOFTLABELS_TEST_DELAY": "0.03"}
    first = subprocess.Popen(_slow_precompute(data, out), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    _wait_for_lease(out, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    lock = out.with_name(out.name + ".lock")
    assert lock.exists()  # the killed holder could not clean up
    rerun = subprocess.run(_slow_precompute(data, out), env={**env, "SOFTLABELS_TEST_DELAY": "0"},
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert presented_valid(out) and not lock.exists()
    assert sorted(os.listdir(tmp_path)) == ["d.npz", out.name]


def test_without_a_lease_hdf5_second_writer_is_told_to_wait_never_to_overwrite(
        tmp_path: Path) -> None:
    """SOFTLABELS_USE_FILE_LOCKING=FALSE (filesystems without locks): HDF5's own lock still
    refuses a second writer, and the message never suggests --overwrite."""
    data = make_npz(tmp_path / "d.npz", n=300)
    out = tmp_path / "set.h5"
    gate = tmp_path / "gate"
    gate.touch()
    env = {**ENV, "SOFTLABELS_TEST_DELAY": "0", "SOFTLABELS_TEST_GATE": str(gate),
           "SOFTLABELS_USE_FILE_LOCKING": "FALSE"}
    first = subprocess.Popen(_slow_precompute(data, out), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        import time

        while not out.exists() and first.poll() is None:
            time.sleep(0.01)
        for extra in (["--overwrite"], []):
            second = subprocess.run(_slow_precompute(data, out, *extra), env=env,
                                    capture_output=True, text=True, timeout=120)
            assert first.poll() is None, "the first writer ended too soon for this test"
            assert second.returncode == 1 and "another process" in second.stderr, second.stderr
            assert "--overwrite" not in second.stderr
        gate.unlink()
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert presented_valid(out)

"""Transfer sets at URLs: written to and read from a local S3 server (moto's server mode, as
s3fs and zarr-python test themselves) and a GCS emulator, read over http from a local
http.server. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from click.testing import CliRunner  # noqa: E402

from conftest import ROOT, TESTS, make_npz  # noqa: E402
from softlabels.cli import cli  # noqa: E402
from softlabels.compute.blocks import precompute  # noqa: E402
from softlabels.errors import (  # noqa: E402
    IntegrityError,
    SoftlabelsError,
    TransferSetError,
    WriterBusyError,
)
from softlabels.format import schema as S  # noqa: E402
from softlabels.format.location import CACHE_ENV  # noqa: E402
from softlabels.format.operations import convert  # noqa: E402
from softlabels.format.reader import open_transfer_set  # noqa: E402
from softlabels.sets.verify import verify  # noqa: E402
from softlabels.train.trainer import train_student  # noqa: E402

TEACHER = "python:helpers:slow"
OPTS = dict(temperatures=[1, 3], chunk_rows=16, batch_size=8, dtype="float32")


@pytest.fixture(autouse=True)
def _no_teacher_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTLABELS_TEST_DELAY", "0")


def _fs():
    import fsspec

    return fsspec.filesystem("s3")


def _same_sets(a_path: str | Path, b_path: str | Path) -> None:
    with open_transfer_set(a_path) as a, open_transfer_set(b_path) as b:
        assert a.meta["dataset"]["fingerprint"] == b.meta["dataset"]["fingerprint"]
        assert sorted(a.layout.arrays()) == sorted(b.layout.arrays())
        for name in [*a.layout.arrays(), S.ARRAY_CHECKSUM, S.BLOCK_DONE]:
            x, y = a.store.read(name), b.store.read(name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


# --- write, read, stream ----------------------------------------------------------------------
def test_precompute_to_s3_then_info_verify_and_streamed_training(tmp_path: Path,
                                                                 bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/sets/run.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    precompute(data, [TEACHER], tmp_path / "ref.zarr", **OPTS, random_teacher=True)
    _same_sets(url, tmp_path / "ref.zarr")
    assert not _fs().exists(f"{bucket}/sets/run.zarr.lock")  # the lease is given back

    info = CliRunner().invoke(cli, ["info", url])
    assert info.exit_code == 0, info.output
    assert info.output.startswith(f"{url}  (zarr, ") and "complete" in info.output
    report = verify(url, data=data)
    assert report.ok, report.to_dict()

    kwargs = dict(transfer_set=url, temperature=3.0, epochs=1, batch_size=16, seed=0)
    streamed = train_student(data, "mlp:16-8-3", stream=True, **kwargs)
    local = train_student(data, "mlp:16-8-3", stream=True,
                          **{**kwargs, "transfer_set": tmp_path / "ref.zarr"})
    for key, value in local.model.state_dict().items():
        assert np.array_equal(streamed.model.state_dict()[key].numpy(), value.numpy()), key


def test_a_block_read_costs_one_request_per_array(tmp_path: Path, bucket: str) -> None:
    """Each request waits a round trip on a real bucket: a chunk is one GET, with no HEAD
    before it (s3fs asks an object's size first unless told not to split objects)."""
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/r.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    seen: list[str] = []

    class Requests(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log, handler = logging.getLogger("werkzeug"), Requests()
    with open_transfer_set(url) as ts:
        ts.read_block(0, [S.LABELS, S.INDEX, S.PROBS], temperature=3.0)  # opens the arrays
        level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        try:
            ts.read_block(1, [S.LABELS, S.INDEX, S.PROBS], temperature=3.0)
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
    asked = [line.split('"')[1] for line in seen if '"GET ' in line or '"HEAD ' in line]
    assert all(line.startswith("GET ") for line in asked), asked
    # one GET per object: the three arrays' chunks, the block's checksums, its done marker
    objects = sorted(line.split()[1].split("/r.zarr/")[1] for line in asked)
    assert objects == ["array_checksum/c/1/0", "block_done/c/1", "index/c/1", "labels/c/1",
                       "probs/c/1/1/0"], asked


def test_sigkill_mid_precompute_on_s3_resumes_to_the_same_set(tmp_path: Path,
                                                              bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=100)
    url = f"s3://{bucket}/killed.zarr"
    args = ["precompute", "--data", data, "--teacher", TEACHER, "--out", url,
            "--temperatures", "1,3", "--chunk-rows", "16", "--batch-size", "8",
            "--dtype", "float32", "--random-teacher"]
    killed = subprocess.run([sys.executable, str(TESTS / "faultpoints.py"),
                             "softlabels.format.writer:write_block", "3", "after", "--", *args],
                            env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(SoftlabelsError, match="being written by|not complete|writing"):
        open_transfer_set(url)  # readers refuse the half-written set
    lease = json.loads(_fs().cat_file(f"{bucket}/killed.zarr.lock"))
    assert lease["pid"] != os.getpid()  # the killed writer's lease is still there

    # the same command again (here in-process): the dead holder's lease is taken over
    rerun = precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    assert rerun.resumed and rerun.rows_computed == 100 - 3 * 16  # only blocks not done
    precompute(data, [TEACHER], tmp_path / "ref.zarr", **OPTS, random_teacher=True)
    _same_sets(url, tmp_path / "ref.zarr")


def test_kill_while_laying_out_in_place_is_laid_out_again(tmp_path: Path, bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/layout.zarr"
    args = ["precompute", "--data", data, "--teacher", TEACHER, "--out", url,
            "--temperatures", "1", "--chunk-rows", "16", "--dtype", "float32", "--random-teacher"]
    killed = subprocess.run([sys.executable, str(TESTS / "faultpoints.py"),
                             "softlabels.format.store:Store.create", "3", "after", "--", *args],
                            env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _fs().exists(f"{bucket}/layout.zarr/zarr.json")  # created in place, then killed
    with pytest.raises(SoftlabelsError):
        open_transfer_set(url)
    rerun = precompute(data, [TEACHER], url, **{**OPTS, "temperatures": [1]}, random_teacher=True)
    assert rerun.rows_computed == 40
    assert verify(url).ok


def test_convert_s3_to_local_and_back_bit_for_bit(tmp_path: Path, bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    local = tmp_path / "made.zarr"
    precompute(data, [TEACHER], local, **OPTS, random_teacher=True)
    up, down = f"s3://{bucket}/up.zarr", tmp_path / "down.zarr"
    runner = CliRunner()
    for src, out in ((local, up), (up, down), (up, tmp_path / "down.h5")):
        result = runner.invoke(cli, ["convert", str(src), "--out", str(out)])
        assert result.exit_code == 0, result.output
    _same_sets(local, up)
    _same_sets(up, down)
    _same_sets(up, tmp_path / "down.h5")
    with open_transfer_set(up) as ts:
        assert ts.meta["provenance"]["converted_from"]["path"] == str(local)
    again = runner.invoke(cli, ["convert", str(local), "--out", up])  # the same command
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    again = runner.invoke(cli, ["convert", str(tmp_path / "down.h5"), "--out", up])
    assert again.exit_code != 0 and "already exists" in again.output


@pytest.mark.slow
def test_a_killed_convert_to_s3_is_resumed_only_by_the_same_command(tmp_path: Path,
                                                                    bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    local = tmp_path / "made.zarr"
    precompute(data, [TEACHER], local, **OPTS, random_teacher=True)
    url = f"s3://{bucket}/conv.zarr"
    killed = subprocess.run([sys.executable, str(TESTS / "faultpoints.py"),
                             "softlabels.format.writer:write_block", "3", "after", "--",
                             "convert", str(local), "--out", url],
                            env=_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(SoftlabelsError, match="incomplete"):
        open_transfer_set(url)
    # another command into the unfinished output is refused, and changes nothing
    other = CliRunner().invoke(cli, ["subset", str(local), "--out", url, "--fraction", "0.5"])
    assert other.exit_code != 0 and "unfinished set written by another command" in other.output
    again = CliRunner().invoke(cli, ["convert", str(local), "--out", url])
    assert again.exit_code == 0, again.output
    _same_sets(local, url)


@pytest.mark.slow
def test_a_dask_cluster_writes_an_s3_set_block_by_block(tmp_path: Path, bucket: str) -> None:
    from softlabels.compute.cluster import precompute_on_cluster

    data = make_npz(tmp_path / "d.npz", n=40)
    args = dict(temperatures=[1, 3], chunk_rows=16, batch_size=8, device="cpu")
    precompute(data, ["mlp:16-8-3"], tmp_path / "single.zarr", **args, random_teacher=True)
    url = f"s3://{bucket}/dist.zarr"
    result = precompute_on_cluster(data, ["mlp:16-8-3"], url, workers=2, **args,
                                   random_teacher=True)
    assert result.rows_computed == 40
    _same_sets(url, tmp_path / "single.zarr")
    assert not _fs().exists(f"{bucket}/dist.zarr.lock")


# --- damage, two writers, leases --------------------------------------------------------------
def test_a_damaged_object_is_caught_by_verify_and_by_training(tmp_path: Path,
                                                              bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/damaged.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    # one flipped bit in block 2's probs at T=3 (a served array: training reads and checks
    # only the arrays it serves, verify reads them all)
    key = f"{bucket}/damaged.zarr/{S.PROBS}/c/1/2/0"
    raw = bytearray(_fs().cat_file(key))
    raw[5] ^= 0x40
    _fs().pipe_file(key, bytes(raw))

    report = verify(url)
    assert not report.ok
    failed = [c for c in report.checks if not c.ok]
    assert "block 2" in failed[0].detail or "2" in failed[0].detail
    with pytest.raises(IntegrityError, match="block 2"):
        train_student(data, "mlp:16-8-3", transfer_set=url, temperature=3.0, epochs=1,
                      stream=True)


def test_a_deleted_block_done_object_is_refused_then_rewritten_by_precompute(
        tmp_path: Path, bucket: str) -> None:
    """A complete set whose `block_done` object of one block is gone (it reads as 0): a read
    of that block is refused naming it, even through a cache; the precompute command rewrites
    it."""
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/undone.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    before = _fs().cat_file(f"{bucket}/undone.zarr/{S.PROBS}/c/1/1/0")
    _fs().rm(f"{bucket}/undone.zarr/{S.BLOCK_DONE}/c/1")
    for cache in (None, str(tmp_path / "cache")):
        with open_transfer_set(url, cache=cache) as ts, pytest.raises(
                IntegrityError, match=r"block 1 \(rows 16-31\).*block_done") as err:
            ts.read_block(1, [S.LABELS])
        assert "\n" not in str(err.value)
    assert not verify(url).ok
    result = precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    assert result.rows_computed == 16 and verify(url).ok
    assert _fs().cat_file(f"{bucket}/undone.zarr/{S.PROBS}/c/1/1/0") == before


def test_a_second_writer_of_one_s3_set_is_refused(tmp_path: Path, bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/busy.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from softlabels.format.lease import WriterLease\n"
         "WriterLease(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", url],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriterBusyError, match=f"pid {holder.pid} on .* being written|"
                                                  f"being written by pid {holder.pid}"):
            precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
        result = CliRunner().invoke(cli, ["convert", str(tmp_path), "--out", url])
        assert result.exit_code != 0
        assert not _fs().exists(f"{bucket}/busy.zarr")  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # its holder is gone (same host, no such pid): the next writer takes the lease over
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    assert verify(url).ok


@pytest.mark.parametrize("expired", [False, True])
def test_a_lease_from_another_machine_holds_until_it_expires(tmp_path: Path, bucket: str,
                                                             expired: bool) -> None:
    data = make_npz(tmp_path / "d.npz", n=20)
    url = f"s3://{bucket}/elsewhere.zarr"
    when = "2000-01-01T00:00:00+00:00" if expired else "2999-01-01T00:00:00+00:00"
    _fs().pipe_file(f"{bucket}/elsewhere.zarr.lock", json.dumps(
        {"host": "another-machine", "pid": 1, "command": "softlabels precompute",
         "started_at": "2000-01-01T00:00:00+00:00", "token": "x", "expires_at": when}).encode())
    if not expired:
        with pytest.raises(WriterBusyError, match="another-machine.*expires at 2999"):
            precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
        return
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    assert verify(url).ok


def test_lease_renewal_notices_a_takeover(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from softlabels.format import remote_lease

    monkeypatch.setattr(remote_lease, "RENEW_SECONDS", 0.05)
    url = f"s3://{bucket}/renewed.zarr"
    lease = remote_lease.RemoteLease(url).acquire()
    try:
        first = json.loads(_fs().cat_file(f"{bucket}/renewed.zarr.lock"))
        time.sleep(0.3)
        assert not lease.lost
        # the taker keeps its lease written, as its own renewals do: a renewal of ours already
        # in flight (read, then put: not conditional) may overwrite one write of it
        other = json.dumps({**first, "token": "other"}).encode()
        deadline = time.time() + 10
        while not lease.lost and time.time() < deadline:
            _fs().pipe_file(f"{bucket}/renewed.zarr.lock", other)
            time.sleep(0.2)
        assert lease.lost
    finally:
        lease.release()
    # a lease that is not ours any more is left in place
    assert json.loads(_fs().cat_file(f"{bucket}/renewed.zarr.lock"))["token"] == "other"


def test_an_s3_output_is_checked_before_any_work(tmp_path: Path, bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=20)
    for out, expected in ((f"s3://{bucket}-missing/set.zarr", "does not exist"),
                          (f"s3://{bucket}/set.h5", "only Zarr sets")):
        result = CliRunner().invoke(cli, ["precompute", "--data", data, "--teacher", TEACHER,
                                          "--out", out, "--random-teacher"])
        assert result.exit_code != 0 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert _fs().ls(bucket) == []


def test_overwrite_on_s3_removes_only_a_transfer_set(tmp_path: Path, bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=20)
    url = f"s3://{bucket}/other.zarr"
    _fs().pipe_file(f"{bucket}/other.zarr/notes.txt", b"not a set")
    with pytest.raises(SoftlabelsError, match="not a softlabels transfer set"):
        precompute(data, [TEACHER], url, overwrite=True, **OPTS, random_teacher=True)
    assert _fs().cat_file(f"{bucket}/other.zarr/notes.txt") == b"not a set"

    url = f"s3://{bucket}/set.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    result = precompute(data, [TEACHER], url, overwrite=True,
                        **{**OPTS, "temperatures": [2]}, random_teacher=True)
    assert result.rows_computed == 20
    with open_transfer_set(url) as ts:
        assert ts.temperatures == [2.0]


# --- http, missing extras, cache, gcs ---------------------------------------------------------
@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_http_reads_a_set_and_refuses_writes(tmp_path: Path, web: tuple[str, Path],
                                             suffix: str) -> None:
    pytest.importorskip("aiohttp")
    base, root = web
    data = make_npz(tmp_path / "d.npz", n=40)
    precompute(data, [TEACHER], root / f"set.{suffix}", **OPTS, random_teacher=True)
    url = f"{base}/set.{suffix}"
    if suffix == "zarr":
        from softlabels.format.backends import open_store

        with open_store(url) as store:
            assert store.names() == []  # the server lists nothing: arrays are probed by name
    _same_sets(url, root / f"set.{suffix}")
    assert verify(url, data=data).ok
    info = CliRunner().invoke(cli, ["info", url])
    assert info.exit_code == 0 and url in info.output, info.output

    for args in (["precompute", "--data", data, "--teacher", TEACHER, "--out", f"{base}/n.zarr",
                  "--random-teacher"],
                 ["convert", str(root / f"set.{suffix}"), "--out", f"{base}/copy.zarr"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code != 0
        assert "read-only" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (root / "n.zarr").exists() and not (root / "copy.zarr").exists()


def test_an_h5_url_that_is_not_hdf5_is_one_line(web: tuple[str, Path]) -> None:
    pytest.importorskip("aiohttp")
    base, root = web
    (root / "notes.h5").write_text("not an HDF5 file\n")
    with pytest.raises(TransferSetError, match="cannot open .*notes.h5 as HDF5"):
        open_transfer_set(f"{base}/notes.h5")
    result = CliRunner().invoke(cli, ["verify", f"{base}/notes.h5"])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output


def test_a_url_without_its_extra_names_the_extra(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    for url, extra in (("s3://bucket/set.zarr", "s3"), ("gs://bucket/set.zarr", "gcs")):
        result = CliRunner().invoke(cli, ["info", url])
        assert result.exit_code != 0
        assert f"pip install 'softlabels[{extra}]'" in result.output
        assert len(result.output.strip().splitlines()) == 1
    data = make_npz(tmp_path / "d.npz", n=20)
    result = CliRunner().invoke(cli, ["precompute", "--data", data, "--teacher", TEACHER,
                                      "--out", "s3://bucket/set.zarr", "--random-teacher"])
    assert result.exit_code != 0 and "softlabels[s3]" in result.output


def test_a_cached_second_epoch_reads_no_object_again(tmp_path: Path, bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/cached.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    cache = tmp_path / "cache"
    with open_transfer_set(url, cache=str(cache)) as ts:
        first = [ts.read_block(b) for b in range(ts.num_blocks)]
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert len(cached) > ts.num_blocks  # the chunks are now on local disk
    fs = _fs()
    chunks = [k for k in fs.find(f"{bucket}/cached.zarr") if "/c/" in k]
    fs.rm(chunks)  # the second epoch cannot read them from the store
    with open_transfer_set(url, cache=str(cache)) as ts:
        for b in range(ts.num_blocks):
            again = ts.read_block(b)
            assert all(np.array_equal(again[n], first[b][n]) for n in again)
    with open_transfer_set(url) as ts, pytest.raises(IntegrityError):
        ts.read_block(0)  # uncached, the chunks are gone

    # `train --cache DIR` reads through the same cache (its environment reaches workers):
    # the chunks are gone from the store, so training succeeds only through the cache
    monkeypatch.setenv(CACHE_ENV, "")
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-8-3", "--out",
                                      str(tmp_path / "s.pt"), "--transfer-set", url,
                                      "--epochs", "1", "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert os.environ[CACHE_ENV] == str(cache)

    # a set replaced at the same URL never reads the old set's cached chunks
    precompute(data, [TEACHER], url, overwrite=True, **{**OPTS, "temperatures": [2]},
               random_teacher=True)
    with open_transfer_set(url, cache=str(cache)) as ts:
        assert ts.temperatures == [2.0] and ts.read_block(0)


def _cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def _read_all(url: str, cache: Path) -> list[dict[str, np.ndarray]]:
    with open_transfer_set(url, cache=str(cache)) as ts:
        return [ts.read_block(b) for b in range(ts.num_blocks)]


def test_the_cache_stays_within_its_bound(tmp_path: Path, bucket: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SOFTLABELS_CACHE_MAX_BYTES bounds the cache: a set larger than it is cached in part
    (and read right, the rest from the store); another set's folder is evicted, least recently
    opened first, to make room for the set being read."""
    data = make_npz(tmp_path / "d.npz", n=40)
    a, b = f"s3://{bucket}/a.zarr", f"s3://{bucket}/b.zarr"
    precompute(data, [TEACHER], a, **OPTS, random_teacher=True)
    precompute(data, [TEACHER], b, **{**OPTS, "temperatures": [2]}, random_teacher=True)
    cache = tmp_path / "cache"
    whole = _read_all(a, cache)  # unbounded (half the free disk): all of it
    full = _cache_bytes(cache)
    assert full > 4000

    bound = full // 2
    monkeypatch.setenv("SOFTLABELS_CACHE_MAX_BYTES", str(bound))
    shutil.rmtree(cache)
    again = _read_all(a, cache)
    assert 0 < _cache_bytes(cache) <= bound
    assert all(np.array_equal(x[n], y[n]) for x, y in zip(whole, again) for n in x)
    _read_all(a, cache)  # a second pass: still within it
    assert _cache_bytes(cache) <= bound

    monkeypatch.setenv("SOFTLABELS_CACHE_MAX_BYTES", str(full + full // 2))
    shutil.rmtree(cache)
    _read_all(a, cache)
    time.sleep(0.05)  # a later opening, by the folders' times
    _read_all(b, cache)  # a's folder goes to make room for b's
    folders = [p for p in cache.glob("*/*") if p.is_dir()]
    assert len(folders) == 1 and _cache_bytes(cache) <= full + full // 2
    with open_transfer_set(b, cache=str(cache)) as ts:
        assert ts.temperatures == [2.0]


def test_a_replaced_sets_cache_folder_is_removed(tmp_path: Path, bucket: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url, cache = f"s3://{bucket}/replaced.zarr", tmp_path / "cache"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    _read_all(url, cache)
    old = [p for p in cache.glob("*/*") if p.is_dir()]
    precompute(data, [TEACHER], url, overwrite=True, **{**OPTS, "temperatures": [2]},
               random_teacher=True)
    _read_all(url, cache)
    new = [p for p in cache.glob("*/*") if p.is_dir()]
    assert len(old) == len(new) == 1 and old != new and not old[0].exists()


def test_train_cache_max_bytes_reaches_the_readers(tmp_path: Path, bucket: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/bounded.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    monkeypatch.setenv(CACHE_ENV, "")
    monkeypatch.setenv("SOFTLABELS_CACHE_MAX_BYTES", "")
    args = ["train", "--data", data, "--model", "mlp:16-8-3", "--out", str(tmp_path / "s.pt"),
            "--transfer-set", url, "--epochs", "1", "--cache", str(tmp_path / "c")]
    result = CliRunner().invoke(cli, [*args, "--cache-max-bytes", "3K"])
    assert result.exit_code == 0, result.output
    assert os.environ["SOFTLABELS_CACHE_MAX_BYTES"] == "3072"
    assert 0 < _cache_bytes(tmp_path / "c") <= 3072
    result = CliRunner().invoke(cli, [*args, "--cache-max-bytes", "lots"])
    assert result.exit_code == 1 and "512M or 20G" in result.output


def test_a_chunk_cached_while_damaged_is_read_again_once_the_store_is_repaired(
        tmp_path: Path, bucket: str) -> None:
    """A chunk damaged in the store and cached by a refused read is dropped from the cache, so
    after the owner repairs the set (verify passes) the same cache does not keep refusing it."""
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/repaired.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    fs, key = _fs(), f"{bucket}/repaired.zarr/{S.PROBS}/c/0/1/0"
    good = fs.cat_file(key)
    fs.pipe_file(key, good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0x10])
                 + good[len(good) // 2 + 1:])
    cache = str(tmp_path / "cache")
    with open_transfer_set(url, cache=cache) as ts, pytest.raises(IntegrityError, match="block 1"):
        ts.read_block(1)
    fs.pipe_file(key, good)  # the owner puts the good object back
    assert verify(url).ok
    with open_transfer_set(url, cache=cache) as ts:
        assert ts.read_block(1)[S.PROBS].shape == (2, 16, 3)


def test_gs_urls_write_and_read_through_gcsfs(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket="bkt")
    server.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST",
                           f"http://127.0.0.1:{server._api._httpd.server_address[1]}")
        data = make_npz(tmp_path / "d.npz", n=40)
        url = f"gs://bkt/sets/{uuid.uuid4().hex[:8]}.zarr"
        precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
        convert(url, tmp_path / "down.zarr")
        _same_sets(url, tmp_path / "down.zarr")
        assert verify(url, data=data).ok
    finally:
        server.stop()


def test_an_unreachable_endpoint_is_one_line_for_a_reader(tmp_path: Path, bucket: str) -> None:
    """Every reading command on a URL whose endpoint does not answer says so in one line (no
    traceback), naming the URL and where the endpoint comes from."""
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "softlabels", "info", f"s3://{bucket}/a.zarr"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"s3://{bucket}/a.zarr" in lines[0], lines
    assert "AWS_ENDPOINT_URL" in lines[0]


def test_an_unreachable_endpoint_is_one_line_for_a_writer(tmp_path: Path, bucket: str) -> None:
    """precompute --out s3://... on an endpoint that does not answer says it cannot reach it,
    not that the bucket is missing (it may well exist), in one line."""
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = make_npz(tmp_path / "d.npz", n=40)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    url = f"s3://{bucket}/w.zarr"
    done = subprocess.run([sys.executable, "-m", "softlabels", "precompute", "--data", data,
                           "--teacher", "mlp:16-3", "--out", url, "--random-teacher"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "cannot reach" in lines[0], lines
    assert "does not exist" not in lines[0]


def test_a_refused_connection_is_refused_before_the_store_library_retries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listening at the endpoint: refused by the connect probe, before s3fs (and
    botocore's retries, ~12 s) is reached. A name that does not resolve is not final (DNS may
    be slow to come up): it is left to the library."""
    import fsspec

    from softlabels.format.location import Remote

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(fsspec, "filesystem", lambda *a, **k: pytest.fail("library reached"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(TransferSetError, match=f"127.0.0.1:{port} .connection refused.*"
                       "AWS_ENDPOINT_URL"):
        open_transfer_set("s3://bucket/a.zarr")
    with pytest.raises(TransferSetError, match="connection refused"):
        Remote(f"http://127.0.0.1:{port}/a.zarr").probe()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://no-such-host.invalid:9000")
    Remote("s3://bucket/a.zarr").probe()  # not refused: the library's retries decide

    # behind a proxy (as botocore reads it from the environment) a direct refusal says
    # nothing about the endpoint: left to the library, unless NO_PROXY names the host
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    Remote("s3://bucket/a.zarr").probe()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(TransferSetError, match="connection refused"):
        Remote("s3://bucket/a.zarr").probe()


def test_a_cache_dir_shared_with_other_files_evicts_only_cache_folders(
        tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--cache ~/.cache` is a directory others use too: eviction removes only the folders the
    cache made (`<url key>/<set key>`), never another program's folders or a user's local set."""
    data = make_npz(tmp_path / "d.npz", n=40)
    url = f"s3://{bucket}/shared.zarr"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    cache = tmp_path / "dot-cache"
    (cache / "pip" / "wheels").mkdir(parents=True)
    (cache / "pip" / "wheels" / "w.whl").write_bytes(b"w" * 5000)
    (cache / "mine.zarr").mkdir()
    (cache / "mine.zarr" / "zarr.json").write_text("{}")
    monkeypatch.setenv("SOFTLABELS_CACHE_MAX_BYTES", "3K")
    whole = _read_all(url, cache)
    assert (cache / "pip" / "wheels" / "w.whl").exists()
    assert (cache / "mine.zarr" / "zarr.json").exists()
    assert len(whole) == 3


def test_metadata_damaged_in_the_cache_is_refused_once_then_fetched_again(
        tmp_path: Path, bucket: str) -> None:
    """A cached `zarr.json` damaged on local disk (the root's or an array's) is refused in one
    line and dropped from the cache, so the next opening reads the intact set from the store."""
    data = make_npz(tmp_path / "d.npz", n=40)
    url, cache = f"s3://{bucket}/meta.zarr", tmp_path / "cache"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    whole = _read_all(url, cache)
    for damaged in (f"{S.PROBS}/zarr.json", "zarr.json"):
        [folder] = [p for p in cache.glob("*/*") if p.is_dir()]
        (folder / damaged).write_text("{garbage")
        with pytest.raises(TransferSetError, match="damaged"):
            _read_all(url, cache)
        again = _read_all(url, cache)
        assert all(np.array_equal(x[n], y[n]) for x, y in zip(whole, again) for n in x)


def test_a_cache_that_cannot_be_written_only_stops_caching(tmp_path: Path, bucket: str) -> None:
    """The cache is an option: where it cannot store an object (a full or read-only disk, a
    folder evicted meanwhile by another process) the set is read from the store, not refused as
    if it were damaged."""
    data = make_npz(tmp_path / "d.npz", n=40)
    url, cache = f"s3://{bucket}/unwritable.zarr", tmp_path / "cache"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    whole = _read_all(url, cache)
    [folder] = [p for p in cache.glob("*/*") if p.is_dir()]
    shutil.rmtree(folder / S.PROBS)
    (folder / S.PROBS).write_text("a file where the cache would write a folder")
    again = _read_all(url, cache)
    assert all(np.array_equal(x[n], y[n]) for x, y in zip(whole, again) for n in x)


def test_a_cache_folder_evicted_while_opening_is_read_uncached(
        tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Another process may evict the folder a reader is preparing (seen once under load as
    'not a Zarr v3 group'): the cache is an aid, so the set is read from the store, said once;
    and a folder evicted between its creation and its timestamp is made again."""
    from softlabels.format import chunk_cache

    data = make_npz(tmp_path / "d.npz", n=40)
    url, cache = f"s3://{bucket}/evicted.zarr", tmp_path / "cache"
    precompute(data, [TEACHER], url, **OPTS, random_teacher=True)
    whole = _read_all(url, tmp_path / "other")
    utime, calls = os.utime, [0]

    def evicted_once(path, *args, **kwargs):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == 1:
            shutil.rmtree(path)  # as another process's eviction would, just then
        return utime(path, *args, **kwargs)

    monkeypatch.setattr(chunk_cache.os, "utime", evicted_once)
    again = _read_all(url, cache)
    assert calls[0] == 2 and any(cache.glob("*/*/zarr.json"))  # made again, and used
    monkeypatch.setattr(chunk_cache, "prepare", lambda *a: (_ for _ in ()).throw(
        FileNotFoundError("evicted meanwhile")))
    with caplog.at_level(logging.WARNING, logger="softlabels.format.location"):
        third = _read_all(url, cache)
    assert "reading" in caplog.text and "uncached" in caplog.text
    for got in (again, third):
        assert all(np.array_equal(x[n], y[n]) for x, y in zip(whole, got) for n in x)


_READER = """
import sys
from softlabels.format.reader import open_transfer_set
for i in range(12):
    with open_transfer_set(sys.argv[2 + i % (len(sys.argv) - 2)], cache=sys.argv[1]) as ts:
        for b in range(ts.num_blocks):
            ts.read_block(b)
"""


@pytest.mark.slow
def test_processes_filling_and_evicting_one_cache_at_once_all_read(tmp_path: Path,
                                                                     bucket: str) -> None:
    """Readers in several processes share one small cache: each evicts the folders the others
    are filling. Every read succeeds (an object evicted under a reader is fetched again or read
    uncached), none is refused as a damaged set."""
    data = make_npz(tmp_path / "d.npz", n=40)
    urls = [f"s3://{bucket}/r{t}.zarr" for t in (1, 2, 3)]
    for t, url in enumerate(urls, 1):
        precompute(data, [TEACHER], url, **{**OPTS, "temperatures": [t]}, random_teacher=True)
    cache = str(tmp_path / "cache")
    env = {**_env(), "SOFTLABELS_CACHE_MAX_BYTES": "6K"}
    procs = [subprocess.Popen([sys.executable, "-c", _READER, cache, *urls[i:], *urls[:i]],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)[-3000:]

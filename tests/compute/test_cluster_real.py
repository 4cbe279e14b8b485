"""Stage one on a real Dask cluster: a `dask scheduler` and `dask worker` processes started
apart from the driver, in other working directories (docs/SCALING.md's recipe), and workers
that cannot see a path, hidden from them in a private mount namespace."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_cluster import assert_same

from conftest import ROOT, TESTS, make_npz
from softlabels import __version__
from softlabels.compute.blocks import precompute, prepare
from softlabels.compute.cluster import (
    check_worker,
    compute_blocks,
    precompute_on_cluster,
    set_token,
)
from softlabels.compute.cluster_tasks import Work
from softlabels.compute.rows import Unit
from softlabels.errors import TransferSetError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.options import PrecomputeOptions
from softlabels.specs import portable_spec
from softlabels.teachers.models import build_model, save_checkpoint

DASK = Path(sys.executable).with_name("dask")


# --- the driver's side, no cluster needed -----------------------------------------------------


def test_specs_are_made_absolute_for_workers(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.pt").touch()
    assert portable_spec("npz:d.npz", kind="DATA") == (f"npz:{tmp_path}/d.npz",
                                                       (f"{tmp_path}/d.npz",), ())
    assert portable_spec("mnist:data?split=test", kind="DATA").spec == \
        f"mnist:{tmp_path}/data?split=test"
    tv = portable_spec("torchvision:CIFAR10?split=test&root=../c d", kind="DATA")
    assert tv.spec == f"torchvision:CIFAR10?split=test&root={tmp_path.parent}/c%20d"
    assert tv.paths == (f"{tmp_path.parent}/c d",)
    assert portable_spec("torchvision:CIFAR10", kind="DATA").paths == (str(tmp_path),)
    assert portable_spec("t.pt", kind="MODEL") == (f"{tmp_path}/t.pt", (f"{tmp_path}/t.pt",), ())
    assert portable_spec("python:pkg.mod:make?n=2", kind="MODEL").modules == ("pkg.mod",)
    for spec in ("mlp:16-3", "torchvision:resnet18"):
        assert portable_spec(spec, kind="MODEL") == (spec, (), ())


def test_worker_check_names_what_it_lacks(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "s.zarr"
    precompute(data, ["mlp:16-3"], out, chunk_rows=16, random_teacher=True)
    token, path = set_token(out), str(tmp_path / "d.npz")
    assert check_worker([path], ["json"], __version__, str(out), token) is None
    assert check_worker([path + "x"], [], __version__) == f"cannot see {path}x"
    assert "cannot import module no_such_mod" in check_worker([], ["no_such_mod"], __version__)
    assert "install the same version" in check_worker([], [], "0.0.0-other")
    assert check_worker([], [], __version__, str(tmp_path / "no.zarr"), token) == \
        f"cannot see the set {tmp_path / 'no.zarr'} (No such file or directory)"
    other = tmp_path / "other.zarr"
    precompute(data, ["mlp:16-3"], other, chunk_rows=32, random_teacher=True)
    assert check_worker([], [], __version__, str(other), token) == \
        f"sees another set at {other} than the driver created"


def test_a_task_that_sees_another_set_writes_nothing(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    precompute(data, ["mlp:16-3"], a, chunk_rows=16, random_teacher=True)
    precompute(data, ["mlp:16-3"], b, chunk_rows=16, temperatures=[2], random_teacher=True)
    _, _, layout_b, _ = prepare(data, ["mlp:16-3"], PrecomputeOptions(chunk_rows=16,
                                                                        temperatures=(2,),
                                                                      random_teacher=True))
    with open_transfer_set(b) as ts:
        before = ts.read("logits")
    with pytest.raises(TransferSetError, match=rf"^process \d+ \(host .*\) failed on block 0 of "
                       rf"{b}: sees another set at {b} than the driver created; every worker "):
        compute_blocks(str(b), layout_b, Unit([0], [0]), Work(
            data, ("mlp:16-3",), PrecomputeOptions(device="cpu", precision="fp32",
                                                   combine="mean-logits", batch_size=8),
            token=set_token(a)))
    with open_transfer_set(b) as ts:
        assert (ts.read("logits") == before).all() and ts.meta["status"] == "complete"


def test_a_complete_set_needs_no_cluster(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    precompute(data, ["mlp:16-3"], tmp_path / "s.zarr", chunk_rows=16, random_teacher=True)
    # nothing listens at this address: reaching for it would fail
    result = precompute_on_cluster(data, ["mlp:16-3"], tmp_path / "s.zarr", chunk_rows=16,
                                   scheduler=f"tcp://127.0.0.1:{free_port()}", random_teacher=True)
    assert result.already_complete and result.rows_computed == 0


def test_cli_refuses_hdf5_on_a_cluster_in_one_line(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    result = run_cli(["--data", data, "--teacher", "mlp:16-3", "--out", "s.h5", "--scheduler",
                      "tcp://127.0.0.1:9"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("Error: --workers/--scheduler write Zarr only (HDF5 has no safe "
                             "parallel writer): use a .zarr --out instead of s.h5\n")
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.slow
def test_cli_names_a_scheduler_it_cannot_reach(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    port = free_port()  # nothing listens there
    result = run_cli(["--data", data, "--teacher", "mlp:16-3", "--random-teacher", "--out",
                      "s.zarr", "--scheduler", f"tcp://127.0.0.1:{port}"], cwd=tmp_path,
                     DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    assert result.returncode == 1
    assert result.stderr == (f"Error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port} "
                             f"(Timed out trying to connect to tcp://127.0.0.1:{port} after 2 s);"
                             " start one with `dask scheduler` or check the address\n")
    assert not (tmp_path / "s.zarr").exists()


# --- a scheduler and workers as separate processes --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(args: list[str], *, cwd: Path, timeout: float = 240, **env_vars: str
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **env_vars}
    return subprocess.run([sys.executable, "-m", "softlabels", "precompute", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def namespaces_work(tmp_path: Path) -> bool:
    """Whether this machine lets a process hide a directory from itself (user and mount
    namespaces), as a worker on a node without the shared filesystem would not see it."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount --bind {tmp_path} {tmp_path}"], capture_output=True,
                           timeout=30, check=False)
    return probe.returncode == 0


class Cluster:
    """`dask scheduler` and `dask worker` processes on 127.0.0.1, each in its own session so
    that stopping one stops its nanny's children; every wait is bounded."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.worker_addresses: list[str] = []
        self._start(["scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":")[-1],
                     "--no-dashboard"], cwd=logs, name="scheduler")
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", int(self.address.rsplit(":")[-1])),
                                         timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the scheduler did not listen within 60 s: {self.log('scheduler')}")

    def _start(self, args: list[str], *, cwd: Path, name: str,
               hide: dict[Path, Path] | None = None) -> None:
        cmd = [str(DASK), *args]
        if hide:  # bind empty (or other) directories over these paths, for this worker only
            mounts = " && ".join(f"mount --bind {src} {dst}" for dst, src in hide.items())
            cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   f"{mounts} && exec \"$0\" \"$@\"", *cmd]
        with open(self.logs / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def add_worker(self, cwd: Path, hide: dict[Path, Path] | None = None) -> str:
        address = f"tcp://127.0.0.1:{free_port()}"
        self._start(["worker", self.address, "--nworkers", "1", "--nthreads", "1",
                     "--no-dashboard", "--host", "127.0.0.1", "--worker-port",
                     address.rsplit(":")[-1]], cwd=cwd, name=f"worker{len(self.procs)}",
                    hide=hide)
        self.worker_addresses.append(address)
        return address

    def wait_for_workers(self) -> None:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(len(self.worker_addresses), timeout=120)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-2000:]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[], Cluster]]:
    made: list[Cluster] = []

    def make() -> Cluster:
        logs = tmp_path / "cluster-logs"
        logs.mkdir(exist_ok=True)
        made.append(Cluster(logs))
        return made[-1]

    yield make
    for c in made:
        c.stop()


@pytest.mark.slow
def test_recipe_with_relative_paths_matches_a_single_process(tmp_path: Path, cluster) -> None:
    driver, elsewhere = tmp_path / "driver", tmp_path / "elsewhere"
    driver.mkdir()
    elsewhere.mkdir()
    make_npz(driver / "d.npz", n=203)
    save_checkpoint(build_model("mlp:16-8-3"), driver / "t.pt", spec="mlp:16-8-3")
    c = cluster()
    for _ in range(2):
        c.add_worker(cwd=elsewhere)  # where npz:d.npz and t.pt do not exist
    c.wait_for_workers()
    args = ["--temperatures", "1,4", "--chunk-rows", "16", "--batch-size", "10"]
    result = run_cli(["--data", "npz:d.npz", "--teacher", "t.pt", "--out", "out/s.zarr", *args,
                      "--scheduler", c.address], cwd=driver)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote out/s.zarr: 203 rows x 3 classes" in result.stdout
    precompute(f"npz:{driver / 'd.npz'}", [str(driver / "t.pt")], tmp_path / "single.zarr",
               temperatures=[1, 4], chunk_rows=16, batch_size=10, random_teacher=True)
    assert_same(driver / "out" / "s.zarr", tmp_path / "single.zarr")
    assert not list(elsewhere.iterdir())  # no worker wrote anything where it was started

    # a failure inside a task: one line naming the worker, the block and the set
    result = run_cli(["--data", "npz:d.npz", "--teacher", "python:helpers:seeded_nan_teacher",
                      "--out", "nan.zarr", *args, "--scheduler", c.address], cwd=driver)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, result.stderr
    worker = line.split("worker ", 1)[1].split(" ", 1)[0]
    assert worker in c.worker_addresses, line
    assert "failed on block " in line and f"of {driver / 'nan.zarr'}: the teacher's output " \
        "has NaN or inf" in line
    assert f"{driver / 'nan.zarr'} is incomplete (" in line
    assert "rerun the same command to compute the rest, or pass --overwrite" in line


@pytest.mark.slow
def test_workers_that_cannot_see_a_path_are_named_before_any_block(tmp_path: Path,
                                                                   cluster) -> None:
    if not namespaces_work(tmp_path):
        pytest.skip("needs user and mount namespaces (unshare) to hide a path from one worker")
    driver, elsewhere = tmp_path / "driver", tmp_path / "elsewhere"
    for d in ("data", "out", "stale", "empty", "decoy", "copy", "other"):
        (driver / d).mkdir(parents=True)
    elsewhere.mkdir()
    data = make_npz(driver / "data" / "d.npz")
    make_npz(driver / "d.npz")
    make_npz(driver / "copy" / "d.npz", n=150)
    make_npz(driver / "other" / "d.npz", n=150, seed=1)  # what the blind worker sees there
    # what the hidden worker sees at driver/stale: another set of the same name
    precompute(data, ["mlp:16-3"], driver / "decoy" / "s.zarr", chunk_rows=16, random_teacher=True)
    c = cluster()
    c.add_worker(cwd=elsewhere)
    blind = c.add_worker(cwd=elsewhere, hide={driver / "data": driver / "empty",
                                              driver / "out": driver / "empty",
                                              driver / "stale": driver / "decoy",
                                              driver / "copy": driver / "other"})
    c.wait_for_workers()
    common = ["--teacher", "mlp:16-3", "--random-teacher", "--chunk-rows", "16", "--scheduler",
              c.address]

    result = run_cli(["--data", "npz:data/d.npz", "--out", "s.zarr", *common], cwd=driver)
    assert result.returncode == 1
    assert result.stderr == (f"Error: worker {blind} cannot see {driver / 'data' / 'd.npz'}: "
                             "every worker must see the DATA, the MODEL files and --out at the "
                             "same path (a shared filesystem); nothing was computed\n")
    assert not (driver / "s.zarr").exists()

    for out, lack in (("out/s.zarr", f"cannot see the set {driver / 'out' / 's.zarr'} (No such "
                                     "file or directory)"),
                      ("stale/s.zarr", f"sees another set at {driver / 'stale' / 's.zarr'} "
                                       "than the driver created")):
        result = run_cli(["--data", "npz:d.npz", "--out", out, *common], cwd=driver)
        assert result.returncode == 1
        assert result.stderr == (
            f"Error: worker {blind} {lack}: every worker must see the DATA, the MODEL files and "
            "--out at the same path (a shared filesystem); nothing was computed, and the empty "
            f"{driver / out} this run created was removed\n")
        assert not (driver / out).exists()  # nothing a rerun could take for a run to resume
    # a set an earlier (single-process) run left incomplete is left as it was
    partial = ["--data", "npz:d.npz", "--teacher", "python:helpers:seeded_nan_teacher",
               "--out", "out/r.zarr", "--chunk-rows", "16", "--batch-size", "8"]
    assert run_cli(partial, cwd=driver).returncode == 1
    with open_store(driver / "out" / "r.zarr") as store:
        before, status = store.read(S.BLOCK_DONE), store.get_meta()["status"]
    assert before.sum() < len(before) and status == "writing"
    result = run_cli([*partial, "--scheduler", c.address], cwd=driver)
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: worker {blind} cannot see the set {driver / 'out' / 'r.zarr'} (No such file or "
        "directory): every worker must see the DATA, the MODEL files and --out at the same path"
        f" (a shared filesystem); nothing was computed, and {driver / 'out' / 'r.zarr'} was "
        "left as it was\n")
    with open_store(driver / "out" / "r.zarr") as store:
        np.testing.assert_array_equal(store.read(S.BLOCK_DONE), before)

    with open_transfer_set(driver / "decoy" / "s.zarr") as ts:
        assert ts.meta["status"] == "complete"  # the set the blind worker saw is untouched

    # same path, other contents on one worker: its tasks fail (a retry may land on the other
    # worker and succeed); either way no row of the other data enters the set
    result = run_cli(["--data", "npz:copy/d.npz", "--out", "copy.zarr", *common], cwd=driver)
    precompute(f"npz:{driver / 'copy' / 'd.npz'}", ["mlp:16-3"], tmp_path / "ref.zarr",
               chunk_rows=16, random_teacher=True)
    if result.returncode == 0:
        assert_same(driver / "copy.zarr", tmp_path / "ref.zarr")
    else:
        assert result.stderr.startswith(f"Error: worker {blind} (host "), result.stderr
        assert (f"npz:{driver / 'copy' / 'd.npz'} holds other examples here than on the driver"
                in result.stderr)
        assert result.stderr.count("\n") == 1
        with open_store(driver / "copy.zarr") as store, \
                open_transfer_set(tmp_path / "ref.zarr") as ref:
            assert store.get_meta()["status"] == "writing"
            for b in np.flatnonzero(store.read(S.BLOCK_DONE)):
                rows = slice(16 * b, 16 * (b + 1))
                np.testing.assert_array_equal(store.read(S.LOGITS, rows), ref.read(S.LOGITS)[rows])

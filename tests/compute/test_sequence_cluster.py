"""Sequence sets on a local Dask cluster (`precompute --workers N` with token DATA): each task
computes one fixed window of blocks, so the set is bit for bit the single-process one, and a
killed worker loses and duplicates nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from test_cluster import worker_processes
from test_cluster_real import cluster as cluster  # a fixture  # noqa: F401
from test_cluster_real import run_cli
from token_data import TEACHER, write_tokens

from conftest import ROOT, TESTS
from softlabels import __version__
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.compute.cluster import check_worker, precompute_on_cluster
from softlabels.compute.positions import WINDOW_BLOCKS
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.specs import portable_spec


def assert_identical(a_path: Path, b_path: Path, same_spec: bool = True) -> None:
    """Every stored array (row arrays, offsets, checksums) and the digest are the same (but
    for the DATA spec as written, when the runs wrote it differently)."""
    with open_transfer_set(a_path) as a, open_transfer_set(b_path) as b:
        differ = {k for k in a.meta["digest"] if a.meta["digest"][k] != b.meta["digest"][k]}
        assert differ == (set() if same_spec else {"dataset"})
        assert a.meta["dataset"]["fingerprint"] == b.meta["dataset"]["fingerprint"]
        names = sorted(a.store.names())
        assert names == sorted(b.store.names())
        for name in names:
            x, y = a.store.read(name), b.store.read(name)
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("kind", ["topk", "sample", "dense"])
def test_cluster_sequence_set_is_the_single_process_set(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        kind: str) -> None:
    monkeypatch.syspath_prepend(str(TESTS))  # worker processes import the helpers teacher
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    tokens = write_tokens(tmp_path / "t.jsonl", n=150)
    args = {"topk": dict(topk=4, dtype="float16"), "sample": dict(sample_k=3),
            "dense": dict(dtype="float32")}[kind]
    args = dict(temperatures=[1, 2], chunk_rows=16, batch_size=4, device="cpu", **args)
    precompute(tokens, [TEACHER], tmp_path / "single.zarr", **args, random_teacher=True)
    result = precompute_on_cluster(tokens, [TEACHER], tmp_path / "dist.zarr", workers=2,
                                   **args, random_teacher=True)
    with open_transfer_set(tmp_path / "dist.zarr") as ts:
        assert ts.num_blocks > 2 * WINDOW_BLOCKS  # several windows, so several tasks
        assert result.rows_computed == ts.num_rows and ts.meta["status"] == S.STATUS_COMPLETE
    assert_identical(tmp_path / "dist.zarr", tmp_path / "single.zarr")


def test_cli_workers_on_token_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    tokens = write_tokens(tmp_path / "t.jsonl", n=40)
    common = ["--data", tokens, "--teacher", TEACHER, "--chunk-rows", "16", "--topk", "3",
              "--temperatures", "1,2"]
    result = CliRunner().invoke(cli, ["precompute", *common, "--out",
                                      str(tmp_path / "dist.zarr"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "positions of 40 sequences x 11 classes" in result.output  # not "rows"
    assert " rows" not in result.stdout
    precompute(tokens, [TEACHER], tmp_path / "single.zarr", chunk_rows=16, topk=3,
               temperatures=[1, 2], random_teacher=True)
    assert_identical(tmp_path / "dist.zarr", tmp_path / "single.zarr")
    # options that do not apply to sequences are refused before a cluster starts
    result = CliRunner().invoke(cli, ["precompute", *common, "--out", str(tmp_path / "k.zarr"),
                                      "--workers", "2", "--keep-members"])
    assert result.exit_code == 1 and "keep-members does not apply" in result.output
    assert not (tmp_path / "k.zarr").exists()


@pytest.mark.slow
def test_killed_worker_neither_loses_nor_duplicates_positions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = write_tokens(tmp_path / "t.jsonl", n=400)
    out, ref = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    monkeypatch.setenv("SOFTLABELS_TEST_DELAY", "0")
    monkeypatch.syspath_prepend(str(TESTS))
    precompute(tokens, [TEACHER], ref, temperatures=[1, 3], chunk_rows=8, batch_size=2,
               topk=3, dtype="float32", random_teacher=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
           "SOFTLABELS_TEST_DELAY": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "precompute", "--data", tokens,
                             "--teacher", TEACHER, "--out", str(out), "--workers", "2",
                             "--temperatures", "1,3", "--chunk-rows", "8", "--batch-size", "2",
                             "--topk", "3", "--dtype", "float32", "--random-teacher"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None and not killed:
        marks = list((out / S.BLOCK_DONE / "c").glob("*")) if out.exists() else []
        workers = worker_processes(proc.pid)
        if len(marks) >= WINDOW_BLOCKS and len(workers) == 2:  # a window done, others running
            workers[0].send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    assert killed, "the run ended before a worker could be killed"
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert_identical(out, ref)


@pytest.mark.slow
def test_a_killed_cluster_run_resumes_bit_for_bit(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver and its workers killed midway; the rerun computes only the pending blocks
    (each in its whole window) and the set is the uninterrupted single-process one."""
    tokens = write_tokens(tmp_path / "t.jsonl", n=300)
    out, ref = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    args = dict(temperatures=[1, 3], chunk_rows=8, batch_size=2, sample_k=2)
    monkeypatch.setenv("SOFTLABELS_TEST_DELAY", "0")
    monkeypatch.syspath_prepend(str(TESTS))
    precompute(tokens, [TEACHER], ref, **args, random_teacher=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
           "SOFTLABELS_TEST_DELAY": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "precompute", "--data", tokens,
                             "--teacher", TEACHER, "--out", str(out), "--workers", "2",
                             "--temperatures", "1,3", "--chunk-rows", "8", "--batch-size", "2",
                             "--sample-k", "2",
                             "--random-teacher"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None and not killed:
        marks = list((out / S.BLOCK_DONE / "c").glob("*")) if out.exists() else []
        if len(marks) >= WINDOW_BLOCKS:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and every worker at once
            killed = True
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert killed, "the run ended before it could be killed"
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    result = precompute_on_cluster(tokens, [TEACHER], out, workers=2, **args, random_teacher=True)
    assert result.resumed and 0 < result.rows_computed < result.num_rows
    assert_identical(out, ref)


def test_token_data_and_hf_specs_are_made_absolute_for_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative tokens: and hf: paths reach a worker started elsewhere as absolute paths, and
    are among the paths every worker is checked to see before any block."""
    monkeypatch.chdir(tmp_path)
    assert portable_spec("tokens:t.jsonl?field=input_ids", kind="DATA") == (
        f"tokens:{tmp_path}/t.jsonl?field=input_ids", (f"{tmp_path}/t.jsonl",), ())
    assert portable_spec("hf:models/tiny", kind="MODEL") == (
        f"hf:{tmp_path}/models/tiny", (f"{tmp_path}/models/tiny",), ())
    assert "cannot see" in check_worker([f"{tmp_path}/t.jsonl"], [], __version__)


@pytest.mark.slow
def test_relative_token_data_on_a_real_scheduler(tmp_path: Path, cluster: Any) -> None:
    """`dask scheduler` and two `dask worker`s started in another directory: relative
    tokens: DATA reaches them, and the set is the single-process one."""
    driver, elsewhere = tmp_path / "driver", tmp_path / "elsewhere"
    driver.mkdir()
    elsewhere.mkdir()
    write_tokens(driver / "t.jsonl", n=120)
    c = cluster()
    for _ in range(2):
        c.add_worker(cwd=elsewhere)  # where tokens:t.jsonl does not exist
    c.wait_for_workers()
    args = ["--temperatures", "1,2", "--chunk-rows", "8", "--topk", "3"]
    result = run_cli(["--data", "tokens:t.jsonl", "--teacher", TEACHER, "--out", "s.zarr",
                      *args, "--scheduler", c.address], cwd=driver)
    assert result.returncode == 0, result.stderr[-2000:]
    precompute(f"tokens:{driver / 't.jsonl'}", [TEACHER], tmp_path / "single.zarr",
               temperatures=[1, 2], chunk_rows=8, topk=3, random_teacher=True)
    assert_identical(driver / "s.zarr", tmp_path / "single.zarr", same_spec=False)
    assert not list(elsewhere.iterdir())

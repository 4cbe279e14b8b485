"""SIGKILL a precompute midway, rerun the same command: the set finishes, identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TESTS, make_npz
from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set


def command(data: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "softlabels", "precompute", "--data", data,
            "--teacher", "python:helpers:slow", "--out", str(out), "--temperatures", "1,3",
            "--chunk-rows", "16", "--batch-size", "8", "--dtype", "float32", "--random-teacher"]


def done_blocks(out: Path) -> int:
    try:
        if out.suffix == ".h5":  # the writer holds HDF5's lock; peek without it
            with h5py.File(out, "r", locking=False) as f:
                return int(f[S.BLOCK_DONE][:].sum())
        with open_store(out, "r") as store:
            return int(store.read(S.BLOCK_DONE).sum())
    except Exception:  # the file may be mid-creation or mid-write
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["zarr", "h5"])
def test_sigkill_then_rerun_gives_identical_set(tmp_path: Path, suffix: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_npz(tmp_path / "d.npz", n=300)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "SOFTLABELS_TEST_DELAY": "0.03"}
    out, ref = tmp_path / f"killed.{suffix}", tmp_path / f"ref.{suffix}"
    monkeypatch.setenv("SOFTLABELS_TEST_DELAY", "0")
    precompute(data, ["python:helpers:slow"], ref, temperatures=[1, 3], chunk_rows=16,
               batch_size=8, dtype="float32", random_teacher=True)

    proc = subprocess.Popen(command(data, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while done_blocks(out) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = done_blocks(out)
    assert 0 < killed_at < 19

    rerun = subprocess.run(command(data, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    computed = int(rerun.stdout.split("resumed, ")[1].split(" computed")[0])
    assert computed <= 300 - 16 * killed_at  # only unfinished blocks are recomputed
    with open_transfer_set(out) as a, open_transfer_set(ref) as b:
        assert a.meta["dataset"]["fingerprint"] == b.meta["dataset"]["fingerprint"]
        for name in (S.LOGITS, S.PROBS, S.LABELS, S.INDEX, S.SAMPLE_HASH):
            np.testing.assert_array_equal(a.read(name), b.read(name))

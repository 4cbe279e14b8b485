"""Stage one on a local Dask cluster: identical output, and a killed worker loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import TESTS, make_npz
from softlabels.compute.blocks import precompute
from softlabels.compute.cluster import precompute_on_cluster
from softlabels.errors import SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sources.load import load_data
from softlabels.teachers.models import build_model

ARRAYS = (S.LOGITS, S.PROBS, S.LABELS, S.INDEX, S.SAMPLE_HASH)


def assert_same(a_path: Path, b_path: Path, names: tuple[str, ...] = ARRAYS) -> None:
    with open_transfer_set(a_path) as a, open_transfer_set(b_path) as b:
        assert a.meta["dataset"]["fingerprint"] == b.meta["dataset"]["fingerprint"]
        for name in names:
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense ensemble", "sampled views"])
def test_cluster_run_is_identical_to_single_process(tmp_path: Path, kind: str) -> None:
    data = make_npz(tmp_path / "d.npz", n=203)
    if kind == "dense ensemble":
        args = dict(temperatures=[1, 4], chunk_rows=32, batch_size=10, keep_members=True,
                    combine="mean-probs", device="cpu")
        teachers, names = ["mlp:16-8-3", "mlp:16-6-3"], ARRAYS + (S.MEMBER_LOGITS,)
    else:
        args = dict(temperatures=[2], chunk_rows=32, batch_size=10, views=2,
                    augment="random-crop:1", sample_k=5, device="cpu")
        teachers = ["mlp:16-8-3"]
        names = (S.SAMPLE_INDICES, S.VIEW_SEED, S.LABELS, S.INDEX, S.SAMPLE_HASH)
    precompute(data, teachers, tmp_path / "single.zarr", **args, random_teacher=True)
    result = precompute_on_cluster(data, teachers, tmp_path / "dist.zarr", workers=2, **args,
                                   random_teacher=True)
    assert result.rows_computed == 203 * (2 if kind == "sampled views" else 1)
    assert_same(tmp_path / "dist.zarr", tmp_path / "single.zarr", names)


def test_cluster_refuses_hdf5_and_objects(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    with pytest.raises(SoftlabelsError, match="write Zarr only"):
        precompute_on_cluster(data, ["mlp:16-3"], tmp_path / "s.h5", workers=2, random_teacher=True)
    with pytest.raises(SoftlabelsError, match="must be positive"):
        precompute_on_cluster(data, ["mlp:16-3"], tmp_path / "s.zarr", workers=0,
                              random_teacher=True)
    # objects cannot be loaded by each worker: only specs travel to a cluster
    with pytest.raises(SoftlabelsError, match="data and teachers must be specs"):
        precompute_on_cluster(load_data(data), ["mlp:16-3"], tmp_path / "s.zarr", workers=2,
                              random_teacher=True)
    with pytest.raises(SoftlabelsError, match="data and teachers must be specs"):
        precompute_on_cluster(data, [build_model("mlp:16-3")], tmp_path / "s.zarr", workers=2,
                              random_teacher=True)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.h5").exists()


def worker_processes(pid: int) -> list[psutil.Process]:
    workers = []
    for kid in psutil.Process(pid).children(recursive=True):
        try:  # a short-lived child may exit (or linger as a zombie) while we look
            if "spawn_main" in " ".join(kid.cmdline()):
                workers.append(kid)
        except psutil.Error:
            pass
    return workers


@pytest.mark.slow
def test_killed_worker_neither_loses_nor_duplicates_rows(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_npz(tmp_path / "d.npz", n=400)
    out, ref = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    common = ["--teacher", "python:helpers:slow", "--temperatures", "1,3", "--chunk-rows", "16",
              "--batch-size", "8", "--dtype", "float32"]
    monkeypatch.setenv("SOFTLABELS_TEST_DELAY", "0")
    monkeypatch.syspath_prepend(str(TESTS))
    precompute(data, ["python:helpers:slow"], ref, temperatures=[1, 3], chunk_rows=16,
               batch_size=8, dtype="float32", random_teacher=True)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "SOFTLABELS_TEST_DELAY": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "precompute", "--data", data,
                             "--out", str(out), "--workers", "2", *common,
                             "--random-teacher"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    killed = False
    while time.time() < deadline and proc.poll() is None and not killed:
        marks = list((out / S.BLOCK_DONE / "c").glob("*")) if out.exists() else []
        workers = worker_processes(proc.pid)
        if len(marks) >= 3 and len(workers) == 2:
            workers[0].send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    assert killed, "the run ended before a worker could be killed"
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-2000:]
    assert "400 rows" in stdout
    assert_same(out, ref)


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (103, 3)])
def test_rank_shares_are_disjoint_and_equal(n: int, world: int) -> None:
    import torch

    from softlabels.train.ranks import rank_share

    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shares = [rank_share(order, r, world).tolist() for r in range(world)]
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == len(flat) and len(flat) == n - n % world
    assert len({len(s) for s in shares}) == 1


@pytest.mark.slow
def test_two_rank_training_under_torchrun(tmp_path: Path) -> None:
    from softlabels.teachers.models import load_checkpoint

    data = make_npz(tmp_path / "d.npz", n=150)
    ts, out = tmp_path / "t.zarr", tmp_path / "s.pt"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], device="cpu", random_teacher=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "-m", "softlabels", "train", "--data", data,
         "--model", "mlp:16-8-3", "--out", str(out), "--transfer-set", str(ts), "--epochs", "2",
         "--batch-size", "16", "--distributed", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports and saves
    _, payload = load_checkpoint(out)
    assert payload["meta"]["world_size"] == 2

"""No `OUT.lock` left behind (issue 23 item 9): after a bad input, a full disk (a write that
raises ENOSPC) or SIGTERM, every writing command releases and removes its lease. Before, SIGTERM
(the default action: no unwinding) left `OUT.lock`, and a full disk said "check the path and
its permissions"."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from softlabels.cli import cli


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savez("d.npz", x=rng.normal(size=(300, 16)).astype(np.float32), y=np.arange(300) % 3)
    result = CliRunner().invoke(cli, ["precompute", "--data", "npz:d.npz", "--teacher",
                                      "mlp:16-3", "--random-teacher", "--chunk-rows", "64",
                                      "--out", "a.zarr"])
    assert result.exit_code == 0, result.output
    return tmp_path


def _no_lock_after(folder: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    assert sorted(p.name for p in folder.glob("*.lock")) == [], (args, result.output)
    return lines[0]


COMMANDS = {
    "precompute": ["precompute", "--data", "npz:d.npz", "--teacher", "mlp:16-3",
                   "--random-teacher", "--chunk-rows", "64", "--out", "p.zarr"],
    "convert": ["convert", "a.zarr", "--out", "c.zarr"],
    "subset": ["subset", "a.zarr", "--out", "s.zarr", "--fraction", "0.5"],
    "merge": ["merge", "a.zarr", "a.zarr", "--out", "m.zarr"],
    "import": ["import", "--out", "i.zarr", "--logits", "z.npy", "--data", "npz:d.npz",
               "--teacher-name", "t"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_full_disk_leaves_no_lease_and_says_so(command: str, folder: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr.storage

    np.save("z.npy", np.zeros((300, 3), np.float32))

    async def full(self, key, value):  # noqa: ANN001, ANN202  (LocalStore.set)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root) / key))

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    line = _no_lock_after(folder, *COMMANDS[command])
    assert "No space left on device" in line and "free space on that disk" in line, line
    out = COMMANDS[command][COMMANDS[command].index("--out") + 1]
    assert "permissions" not in line and f"cannot write {out}" in line  # names the path


def test_a_full_disk_while_training_leaves_no_lease(folder: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    line = _no_lock_after(folder, "train", "--data", "npz:d.npz", "--model", "mlp:16-3",
                          "--out", "t.pt", "--transfer-set", "a.zarr", "--epochs", "1")
    assert "free space" in line


@pytest.mark.parametrize("args", [
    ["precompute", "--data", "npz:d.npz", "--teacher", "mlp:16-4", "--random-teacher",
     "--chunk-rows", "64", "--out", "a.zarr"],  # onto a set of another teacher
    ["subset", "a.zarr", "--out", "s.zarr", "--indices", "idx.npy"],  # an index out of range
    ["import", "--out", "i.zarr", "--logits", "nan.npy", "--data", "npz:d.npz",
     "--teacher-name", "t"],  # NaN logits
])
def test_a_bad_input_leaves_no_lease(args: list[str], folder: Path) -> None:
    np.save("idx.npy", np.array([0, 5, 100000]))
    np.save("nan.npy", np.full((300, 3), np.nan, np.float32))
    _no_lock_after(folder, *args)


def _start(folder: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "softlabels", *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("command", ["precompute", "train"])
def test_sigterm_releases_the_lease(command: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(20000, 16)).astype(np.float32),
             y=np.arange(20000) % 10)
    if command == "precompute":
        args = ["precompute", "--data", "npz:d.npz", "--teacher", "mlp:16-1024-1024-10",
                "--random-teacher", "--chunk-rows", "256", "--out", "k.zarr"]
        lock = tmp_path / "k.zarr.lock"
    else:
        args = ["train", "--data", "npz:d.npz", "--model", "mlp:16-1024-1024-10", "--out",
                "t.pt", "--epochs", "50"]
        lock = tmp_path / "t.pt.lock"
    proc = _start(tmp_path, *args)
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip(f"{command} ended before it could be stopped")
    time.sleep(0.3)  # inside the work
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # before: 143 too, but OUT.lock stayed
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "terminated", err
    assert not lock.exists()

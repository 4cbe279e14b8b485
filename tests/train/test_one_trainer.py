"""One `softlabels train` per --out: a second trainer of the same checkpoint (which would share
its resume state OUT.state) is refused in one line naming the holder; a killed holder's lease is
taken over at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TESTS, make_npz

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def _train(data: str, out: Path, epochs: int = 3) -> list[str]:
    return [sys.executable, "-m", "softlabels", "train", "--data", data, "--model",
            "python:helpers:slow", "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16"]


def _wait_for(condition, what: str, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_trainer_of_one_out_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", n=60)
    out, gate = tmp_path / "s.pt", tmp_path / "gate"
    gate.touch()  # holds the first trainer at its second forward pass while the file exists
    env = {**ENV, "SOFTLABELS_TEST_DELAY": "0", "SOFTLABELS_TEST_GATE": str(gate)}
    first = subprocess.Popen(_train(data, out), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = Path(f"{out}.lock")
        _wait_for(lambda: lock.exists() and lock.read_text().strip(), "the first lease")
        assert json.loads(lock.read_text())["pid"] == first.pid

        second = subprocess.run(_train(data, out), env={**env, "SOFTLABELS_TEST_GATE": ""},
                                capture_output=True, text=True, timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0], lines
        assert "Traceback" not in second.stderr and not out.exists()
        assert first.poll() is None  # the holder carries on, untouched

        first.send_signal(signal.SIGKILL)  # a stale lease: its holder is gone
        first.wait(timeout=60)
        third = subprocess.run(_train(data, out), env={**env, "SOFTLABELS_TEST_GATE": ""},
                               capture_output=True, text=True, timeout=300)
        assert third.returncode == 0, third.stderr
        assert out.is_file() and not lock.exists()  # written, and the lease given back
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

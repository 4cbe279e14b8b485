"""Ctrl-C at any point of start-up or of a command: one line ("interrupted"), status 130, no
traceback (issue 23: a Ctrl-C while torch was being imported printed a traceback, because the
package root imported torch before the command line could catch anything)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hostile_servers import hostile

from conftest import ROOT

# A child that sends itself SIGINT when a named module starts to be imported, then runs the
# command line as the console script does: deterministic points of start-up.
CHILD = textwrap.dedent("""
    import importlib.abc, os, signal, sys
    target = sys.argv[1]

    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target_module=None):
            if name == target:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["softlabels", *sys.argv[2:]]
    from softlabels.__main__ import main
    main()
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _assert_interrupted(proc: subprocess.CompletedProcess | subprocess.Popen, err: str) -> None:
    assert "Traceback" not in err, err
    assert "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted"], err
    assert proc.returncode == 130, (proc.returncode, err)


@pytest.mark.parametrize("module", ["click", "softlabels.cli", "numpy", "torch",
                                    "torch.nn", "softlabels.cli.precompute",
                                    "softlabels.format"])
def test_ctrl_c_while_importing_is_one_line_and_130(module: str, tmp_path: Path) -> None:
    args = ["info", str(tmp_path / "missing.zarr")]
    proc = subprocess.run([sys.executable, "-c", CHILD, module, *args], env=_env(),
                          capture_output=True, text=True, timeout=120)
    _assert_interrupted(proc, proc.stderr)


def test_the_package_root_does_not_import_torch() -> None:
    code = ("import sys, softlabels, softlabels.__main__; "
            "print('torch' in sys.modules, softlabels.__version__)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[0] == "False"
    # the public names still resolve, on first use
    code = ("import softlabels; print(softlabels.precompute.__module__, 'kd_loss' in "
            "dir(softlabels), set(softlabels.__all__) == {*softlabels._EXPORTS, '__version__'})")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["softlabels.compute.blocks", "True", "True"]


def test_ctrl_c_inside_a_command_is_one_line_and_130() -> None:
    # a command waiting in the library: `info` of a URL whose server never answers
    with hostile("silent") as url:
        proc = subprocess.Popen([sys.executable, "-m", "softlabels", "--timeout", "60", "info",
                                 f"http://{url}/set.zarr"], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not _connected(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    _assert_interrupted(proc, err)


def _connected(pid: int) -> bool:
    """True once the process holds a TCP connection (it is waiting on the server)."""
    try:
        return any(os.readlink(fd).startswith("socket:")
                   for fd in (f"/proc/{pid}/fd/{n}" for n in os.listdir(f"/proc/{pid}/fd")))
    except OSError:
        return False


def _loaded(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_while_torch_loads_through_the_real_entry_point(tmp_path: Path) -> None:
    # `python -m softlabels` as a user runs it; the signal arrives once torch's libraries are
    # mapped (mid-import), a moment found by watching the process, not by a sleep
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "info",
                             str(tmp_path / "missing.zarr")], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _loaded(proc.pid, "torch") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("start-up finished before the signal")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    _assert_interrupted(proc, err)

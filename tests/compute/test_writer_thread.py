"""The writer thread that overlaps storage with a GPU teacher, proven on the CPU: a GPU run takes
this path (`SOFTLABELS_WRITER_THREAD` forces it here), so it must write the same set as the
inline path, bound the batches in flight, surface a failed write and leave a resumable set."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CHUNK, ROOT, TESTS
from softlabels.compute.blocks import WRITER_QUEUE, precompute, writer_thread
from softlabels.errors import OptionError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with open_transfer_set(path) as ts:
        assert ts.meta["status"] == "complete"
        return {name: ts.read(name) for name in ts.row_arrays()}


@pytest.mark.parametrize("extra", [{}, {"topk": 2}, {"views": 2, "augment": "random-crop:1"}],
                         ids=["dense", "topk", "views"])
def test_the_writer_thread_writes_what_the_inline_path_writes(
        npz_data: str, tmp_path: Path, suffix: str, extra: dict,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sets = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", flag)
        sets[flag] = tmp_path / f"set{flag}.{suffix}"
        precompute(npz_data, ["mlp:16-8-3"], sets[flag], temperatures=[1, 4],
                   chunk_rows=CHUNK, batch_size=7, **extra, random_teacher=True)
    inline, threaded = _arrays(sets["0"]), _arrays(sets["1"])
    assert inline.keys() == threaded.keys()
    for name in inline:
        np.testing.assert_array_equal(threaded[name], inline[name], err_msg=name)


def test_the_teacher_runs_at_most_a_queue_ahead_of_the_writer(
        npz_data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded: a slow store holds the teacher back instead of piling up batches."""
    stage = sys.modules["softlabels.compute.examples"]
    monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", "1")
    ran, written, ahead = [0], [0], []
    forward, add = stage.ExampleRows.forward, stage._BlockAssembler.add

    def counted_teacher(self, *args):  # noqa: ANN001, ANN202
        ran[0] += 1
        ahead.append(ran[0] - written[0])
        return forward(self, *args)

    def slow_add(self, *args):  # noqa: ANN001, ANN202
        time.sleep(0.02)
        add(self, *args)
        written[0] += 1

    monkeypatch.setattr(stage.ExampleRows, "forward", counted_teacher)
    monkeypatch.setattr(stage._BlockAssembler, "add", slow_add)
    precompute(npz_data, ["mlp:16-8-3"], tmp_path / "s.zarr", temperatures=[1, 4],
               chunk_rows=CHUNK, batch_size=4, random_teacher=True)
    assert written[0] == ran[0] == 26  # 103 rows in batches of 4 (blocks end batches)
    # the queue's batches, the one the writer holds, and the one just computed
    assert max(ahead) <= WRITER_QUEUE + 2
    assert max(ahead) > 2  # the teacher did run ahead of the slow writer


def test_a_failed_write_on_the_thread_stops_the_run_and_leaves_it_resumable(
        npz_data: str, tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = sys.modules["softlabels.compute.examples"]
    monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", "1")
    out = tmp_path / f"s.{suffix}"
    calls, write_block = [0], stage.TransferSetWriter.write_block

    def failing(self, block, arrays):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == 3:
            assert threading.current_thread().name == "softlabels-writer"
            raise OSError("No space left on device")
        write_block(self, block, arrays)

    monkeypatch.setattr(stage.TransferSetWriter, "write_block", failing)
    with pytest.raises(OSError, match="No space left"):
        precompute(npz_data, ["mlp:16-8-3"], out, temperatures=[1, 4], chunk_rows=CHUNK,
                   random_teacher=True)
    assert not any(t.name == "softlabels-writer" for t in threading.enumerate())
    with open_store(out, "r") as store:
        assert store.get_meta()["status"] == "writing"
        done = store.read(S.BLOCK_DONE)
        assert int(done.sum()) == 2 and len(done) == 7  # two blocks landed, then the failure
    monkeypatch.setattr(stage.TransferSetWriter, "write_block", write_block)
    precompute(npz_data, ["mlp:16-8-3"], out, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", "0")
    fresh = tmp_path / f"fresh.{suffix}"
    precompute(npz_data, ["mlp:16-8-3"], fresh, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    resumed, want = _arrays(out), _arrays(fresh)
    for name in want:
        np.testing.assert_array_equal(resumed[name], want[name], err_msg=name)


def test_a_kill_while_the_thread_writes_leaves_a_set_that_resumes(npz_data: str,
                                                                 tmp_path: Path) -> None:
    """SIGKILL after the second block written by the writer thread, then the same command."""
    out = tmp_path / "s.zarr"
    args = ["precompute", "--data", npz_data, "--teacher", "mlp:16-8-3", "--out", str(out),
            "--temperatures", "1,4", "--chunk-rows", str(CHUNK), "--random-teacher"]
    env = {"SOFTLABELS_WRITER_THREAD": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, str(TESTS / "faultpoints.py"),
         "softlabels.format.writer:TransferSetWriter.write_block", "2", "after", "--", *args],
        env={**os.environ, **env}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    with open_store(out, "r") as store:
        assert store.get_meta()["status"] == "writing"
        assert int(store.read(S.BLOCK_DONE).sum()) == 2
    resumed = subprocess.run([sys.executable, "-m", "softlabels", *args],
                             env={**os.environ, **env}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    with open_transfer_set(out) as ts:
        assert ts.meta["status"] == "complete" and bool(ts.read(S.BLOCK_DONE).all())


def test_the_switch_takes_only_1_or_0(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, cuda, want in (("", False, False), ("", True, True), ("1", False, True),
                              ("0", True, False)):
        monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", value)
        assert writer_thread(cuda) is want
    monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", "yes")
    with pytest.raises(OptionError, match="1 or 0"):
        writer_thread(False)


class _ReusedOutput(nn.Module):
    """A teacher whose forward writes into one output tensor and returns it every call, as
    models that keep an output buffer do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x.flatten(1))
        if self.out is None or self.out.shape != z.shape:
            self.out = torch.empty_like(z)
        return self.out.copy_(z)


@pytest.mark.parametrize("suffix", ["zarr"])
def test_a_teacher_reusing_its_output_tensor_is_stored_row_by_row(
        npz_data: str, out_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a batch queued for the writer thread must not alias the teacher's output:
    the next batch would overwrite it before it is written (one float32 member: no cast, no
    stack makes a copy)."""
    stage = sys.modules["softlabels.compute.examples"]
    monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", "1")
    add = stage._BlockAssembler.add

    def slow_add(self, *args):  # noqa: ANN001, ANN202
        time.sleep(0.01)  # the teacher runs ahead of the writer, as a slow store lets it
        return add(self, *args)

    monkeypatch.setattr(stage._BlockAssembler, "add", slow_add)
    torch.manual_seed(0)
    teacher = _ReusedOutput().eval()
    precompute(npz_data, [teacher], out_path, temperatures=[1, 4], dtype="float32",
               chunk_rows=CHUNK, batch_size=7)
    with torch.no_grad():  # the same batches (blocks cut into 7s): a kernel's last bits may
        x = torch.from_numpy(np.load(npz_data.removeprefix("npz:"))["x"]).flatten(1)  # vary
        cuts = [(i, min(i + 7, b + CHUNK, len(x))) for b in range(0, len(x), CHUNK)
                for i in range(b, min(b + CHUNK, len(x)), 7)]  # with the batch's shape
        want = torch.cat([teacher.lin(x[i:j]) for i, j in cuts]).numpy()
    stored = _arrays(out_path)
    np.testing.assert_array_equal(stored[S.LOGITS], want[stored[S.INDEX]])


@pytest.mark.parametrize("flag, where", [("1", "softlabels-writer"), ("0", "MainThread")])
def test_a_cpu_teachers_targets_are_made_on_the_writer_thread(
        npz_data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str,
        where: str) -> None:
    """On the CPU the tempering, storage dtypes and top-k are CPU work like the teacher's own:
    with a writer thread they run there, beside the next forward pass (which stays on the
    calling thread); inline, on the calling thread. For both kinds of row; the sets' bytes are
    the inline path's (the test above)."""
    from token_data import TEACHER, write_tokens

    stage = sys.modules["softlabels.compute.blocks"]
    monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", flag)
    made: dict[str, set[str]] = {"forward": set(), "targets": set()}

    def recorded(step: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def record(self, *args):  # noqa: ANN001, ANN202
            made[step].add(threading.current_thread().name)
            return call(self, *args)
        return record

    for kind in stage.KINDS.values():
        for step in made:
            monkeypatch.setattr(type(kind), step, recorded(step, getattr(type(kind), step)))
    precompute(npz_data, ["mlp:16-8-3"], tmp_path / "e.zarr", chunk_rows=CHUNK, batch_size=7,
               random_teacher=True)
    precompute(write_tokens(tmp_path / "t.jsonl"), [TEACHER], tmp_path / "s.zarr", topk=3,
               chunk_rows=CHUNK, batch_size=4)
    assert made == {"forward": {"MainThread"}, "targets": {where}}

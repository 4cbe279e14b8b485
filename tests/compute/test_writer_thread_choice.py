"""Where the writer thread runs by default on the CPU (issue 22.1): a single-process run whose
teacher leaves a core free writes on the thread (overlapping the teacher), one whose torch
threads and loader workers take every core writes inline; SOFTLABELS_WRITER_THREAD overrides."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import CHUNK
from softlabels.compute.blocks import precompute, spare_core


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("SOFTLABELS_WRITER_THREAD", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_core_is_spare_only_when_torch_and_the_workers_leave_one(two_cores: None) -> None:
    torch.set_num_threads(1)
    assert spare_core(0)
    assert not spare_core(1)  # one loader worker takes the other core
    torch.set_num_threads(2)
    assert not spare_core(0)


def _writing_threads(npz_data: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    stage = sys.modules["softlabels.compute.examples"]
    names, write_block = set(), stage.TransferSetWriter.write_block

    def recorded(self, block, arrays):  # noqa: ANN001, ANN202
        names.add(threading.current_thread().name)
        write_block(self, block, arrays)

    monkeypatch.setattr(stage.TransferSetWriter, "write_block", recorded)
    precompute(npz_data, ["mlp:16-8-3"], out, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return names


@pytest.mark.parametrize(("threads", "env", "where"), [
    (1, None, "softlabels-writer"),  # a core left free: the thread
    (2, None, "MainThread"),  # torch takes both cores: inline
    (1, "0", "MainThread"),  # the switch wins either way
    (2, "1", "softlabels-writer"),
])
def test_precompute_writes_on_the_thread_where_a_core_is_free(
        two_cores: None, npz_data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        threads: int, env: str | None, where: str) -> None:
    torch.set_num_threads(threads)
    if env is not None:
        monkeypatch.setenv("SOFTLABELS_WRITER_THREAD", env)
    assert _writing_threads(npz_data, tmp_path / "s.zarr", monkeypatch) == {where}

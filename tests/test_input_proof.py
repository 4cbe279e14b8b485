"""Inputs proven on every resume: a training run resumed onto a replaced --data or --indices
file is refused (not "resuming after epoch 1" on other data); a set operation records the digest
of every file it read, refuses to resume onto a changed one, and a rerun of a finished one
says "already complete"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, TESTS, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import MismatchError
from softlabels.format.reader import open_transfer_set
from softlabels.input_proof import file_digest, folder_digest, input_digests
from softlabels.teachers.models import build_model
from softlabels.train.resume import load_state, save_state, state_path


class Killed(Exception):
    pass


def _kill_after_first_epoch(event: str, info: dict) -> None:
    if event == "epoch":
        raise Killed


def _train(data: str, out: Path, **kwargs: object) -> object:
    from softlabels.train.trainer import train_student

    return train_student(data, "mlp:16-8-3", epochs=2, batch_size=16, device="cpu", out=out,
                         **kwargs)


@pytest.mark.parametrize("changed", ["data", "indices"])
def test_a_resume_onto_a_replaced_input_is_refused(tmp_path: Path, changed: str) -> None:
    data = make_npz(tmp_path / "d.npz")
    indices = tmp_path / "keep.txt"
    indices.write_text("\n".join(map(str, range(0, 90))))
    out = tmp_path / "m.pt"
    with pytest.raises(Killed):
        _train(data, out, indices=str(indices), callbacks=[_kill_after_first_epoch])
    assert state_path(out).exists()
    if changed == "data":
        make_npz(tmp_path / "d.npz", seed=1)  # another dataset at the same path
    else:
        indices.write_text("\n".join(map(str, range(10, 100))))
    with pytest.raises(MismatchError, match=f"--{changed} changed since .*after epoch 1"):
        _train(data, out, indices=str(indices))
    assert not out.exists()
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-8-3",
                                      "--out", str(out), "--epochs", "2", "--batch-size", "16",
                                      "--indices", str(indices)])
    assert result.exit_code != 0 and f"--{changed} changed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_resume_onto_the_same_inputs_continues(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "m.pt"
    with pytest.raises(Killed):
        _train(data, out, callbacks=[_kill_after_first_epoch])
    result = _train(data, out)
    assert [h["epoch"] for h in result.history] == [1, 2]
    from softlabels.teachers.models import load_checkpoint

    assert load_checkpoint(out)[1]["meta"]["resumed_after_epoch"] == 1


def test_a_state_from_before_input_digests_still_resumes(tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    net = build_model("mlp:16-3")
    save_state(out, digest="d", epoch=1, history=[], model=net,
               optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
               generator=torch.Generator())
    assert load_state(out, "d", {"data": "sha256:x"}) is not None


def test_digests_follow_the_content(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    first = file_digest(f)
    f.write_bytes(b"two")
    assert file_digest(f) != first
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"x")
    before = folder_digest(folder)
    (folder / "cat" / "2.png").write_bytes(b"y")
    assert folder_digest(folder) != before
    assert input_digests(f"npz:{f}?mmap=1")["data"] == file_digest(f)
    assert input_digests(f"imagefolder:{folder}")["data"] == folder_digest(folder)
    assert input_digests("python:pkg.mod:f")["data"] is None


@pytest.fixture
def source(tmp_path: Path) -> Path:
    data = make_npz(tmp_path / "d.npz")
    src = tmp_path / "s.zarr"
    precompute(data, ["mlp:16-8-3"], src, temperatures=[2.0], chunk_rows=16, random_teacher=True)
    return src


def test_a_subset_records_its_index_file_and_a_rerun_says_already_complete(
        tmp_path: Path, source: Path) -> None:
    indices = tmp_path / "keep.txt"
    indices.write_text("1 2 3 50 60")
    args = ["subset", str(source), "--out", str(tmp_path / "cut.h5"), "--indices", str(indices)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    with open_transfer_set(tmp_path / "cut.h5") as ts:
        sub = ts.meta["provenance"]["subset_of"]
        assert sub["indices_digest"] == file_digest(indices) and sub["identity"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    indices.write_text("1 2 3 50 61")  # another selection into the same output
    changed = CliRunner().invoke(cli, args)
    assert changed.exit_code != 0 and "already exists" in changed.output
    with open_transfer_set(tmp_path / "cut.h5") as ts:
        assert sorted(ts.index().tolist()) == [1, 2, 3, 50, 60]


@pytest.mark.slow
def test_a_killed_subset_to_s3_is_not_resumed_onto_a_changed_index_file(
        tmp_path: Path, source: Path, bucket: str) -> None:  # noqa: F811  (the fixture)
    """At a URL a killed subset is resumed in place, block by block; an --indices file edited
    meanwhile would make a set of rows neither file names. Its digest in the provenance
    refuses that."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    indices = tmp_path / "keep.txt"
    indices.write_text(" ".join(map(str, range(0, 100, 2))))
    url = f"s3://{bucket}/cut.zarr"
    args = ["subset", str(source), "--out", url, "--indices", str(indices)]
    killed = subprocess.run([sys.executable, str(TESTS / "faultpoints.py"),
                             "softlabels.format.writer:write_block", "1", "after", "--", *args],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    indices.write_text(" ".join(map(str, range(1, 100, 2))))
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "another command" in again.output, again.output
    indices.write_text(" ".join(map(str, range(0, 100, 2))))  # the original: resumed
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    with open_transfer_set(url) as ts:
        assert ts.index().tolist() == list(range(0, 100, 2))

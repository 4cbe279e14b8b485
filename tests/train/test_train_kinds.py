"""Stage two written once (trainer.fit) for every kind of row: a sequence run proves its
inputs on resume as an example run does (the digests of --data and --indices in its state),
and resumes mid-epoch (--state-every) bit for bit, in memory and streamed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from token_data import TEACHER, write_tokens

from softlabels.compute.blocks import precompute
from softlabels.errors import MismatchError
from softlabels.format.layout import ROW_KINDS
from softlabels.teachers.models import load_checkpoint
from softlabels.train.batches import KINDS
from softlabels.train.resume import state_path
from softlabels.train.trainer import train_student


class Killed(Exception):
    pass


def _kill_at(event_name: str, **where: int):  # noqa: ANN202
    def callback(event: str, info: dict) -> None:
        if event == event_name and all(info.get(k) == v for k, v in where.items()):
            raise Killed
    return callback


def test_every_kind_of_row_has_its_rows() -> None:
    assert set(KINDS) == set(ROW_KINDS)


@pytest.mark.parametrize("changed", ["data", "indices"])
def test_a_sequence_resume_onto_a_replaced_input_is_refused(tmp_path: Path, changed: str) -> None:
    tokens = write_tokens(tmp_path / "t.jsonl", n=30)
    indices = tmp_path / "keep.txt"
    indices.write_text("\n".join(map(str, range(0, 25))))
    out = tmp_path / "s.pt"
    args = dict(epochs=2, batch_size=8, device="cpu", out=out, indices=str(indices))
    with pytest.raises(Killed):
        train_student(tokens, TEACHER, callbacks=[_kill_at("epoch", epoch=1)], **args)
    assert state_path(out).exists()
    if changed == "data":
        write_tokens(tmp_path / "t.jsonl", n=30, seed=1)  # other tokens at the same path
    else:
        indices.write_text("\n".join(map(str, range(5, 30))))
    with pytest.raises(MismatchError, match=f"--{changed} changed since .*after epoch 1"):
        train_student(tokens, TEACHER, **args)
    assert not out.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_a_sequence_run_killed_mid_epoch_resumes_bit_for_bit(tmp_path: Path,
                                                            stream: bool) -> None:
    tokens = write_tokens(tmp_path / "t.jsonl", n=61)
    seq_set = tmp_path / "k.zarr"
    precompute(tokens, [TEACHER], seq_set, chunk_rows=16, topk=4, temperatures=[1, 2],
               random_teacher=True)
    args = dict(transfer_set=seq_set, epochs=2, batch_size=8, lr=0.01, seed=2, stream=stream,
                device="cpu", state_every=3)
    whole = train_student(tokens, TEACHER, out=tmp_path / "whole.pt", **args)
    out = tmp_path / "r.pt"
    with pytest.raises(Killed):  # after step 6 of epoch 2, whose state was written
        train_student(tokens, TEACHER, out=out, callbacks=[_kill_at("batch", epoch=1, batch=7)],
                      **args)
    state = torch.load(state_path(out), weights_only=True)
    assert state["epoch"] == 1 and state["stream"] == {"epoch": 1, "batches": 6, "seed": 2}
    resumed = train_student(tokens, TEACHER, out=out, **args)
    assert load_checkpoint(out, trust_code=True)[1]["meta"]["resumed_after_epoch"] == 1
    assert resumed.history == whole.history
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert not state_path(out).exists()

"""`softlabels train` and `info` on sequence sets: a sequence student trains from the stored
targets, in memory or streamed (by size or --stream), on whole sequences selected as `subset`
selects them; `info` speaks of positions and sequences."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import TEACHER, write_tokens

from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format.backends import open_store
from softlabels.format.operations import subset
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import SEQ_TOKENS
from softlabels.teachers.models import load_checkpoint
from softlabels.train import batches
from softlabels.train.trainer import train_student


@pytest.fixture
def lm(tmp_path: Path) -> tuple[str, Path]:
    """Token data (61 sequences, 492 positions) and its top-k sequence set."""
    tokens = write_tokens(tmp_path / "t.jsonl", n=61)
    precompute(tokens, [TEACHER], tmp_path / "k.zarr", chunk_rows=16, topk=4,
               temperatures=[1, 2], random_teacher=True)
    return tokens, tmp_path / "k.zarr"


def meta(path: Path) -> dict:
    return load_checkpoint(path, trust_code=True)[1]["meta"]


def test_cli_trains_a_sequence_student_streamed_on_request(tmp_path: Path,
                                                           lm: tuple[str, Path]) -> None:
    tokens, seq_set = lm
    base = ["train", "--data", tokens, "--model", TEACHER + "?seed=5", "--transfer-set",
            str(seq_set), "--epochs", "3", "--batch-size", "8", "--lr", "0.01",
            "--temperature", "2", "--val-data", tokens]
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "s.pt"), "--stream"])
    assert result.exit_code == 0, result.output
    assert "trained 3 epochs on 492 positions" in result.output
    assert "val_perplexity" in result.output
    m = meta(tmp_path / "s.pt")
    assert m["streamed"] is True and m["rows"] == 492 and m["sequences"] == 61
    assert m["transfer_set"]["temperature"] == 2.0 and m["transfer_set"]["alpha"] == 0.9
    losses = [h["loss"] for h in m["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert m["history"][-1]["val_perplexity"] < m["history"][0]["val_perplexity"] * 1.01
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    assert meta(tmp_path / "m.pt")["streamed"] is False  # small: loaded


def test_train_streams_a_set_over_the_memory_threshold(tmp_path: Path, lm: tuple[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tokens, seq_set = lm
    monkeypatch.setattr(batches, "MAX_IN_MEMORY", 1000)  # targets: 492 x 4 x 8 bytes
    result = train_student(tokens, TEACHER, transfer_set=seq_set, out=tmp_path / "s.pt",
                           epochs=1, batch_size=8)
    assert meta(tmp_path / "s.pt")["streamed"] is True and result.rows == 492
    # damage: the streamed run stops naming the block, and saves nothing
    with open_store(seq_set, "r+") as store:
        token = int(store.read(SEQ_TOKENS)[40])
        store.write(SEQ_TOKENS, slice(40, 41), np.array([(token + 1) % 11], np.int32))
    with pytest.raises(IntegrityError, match="block 2 "):
        train_student(tokens, TEACHER, transfer_set=seq_set, out=tmp_path / "d.pt", epochs=1,
                      batch_size=8)
    assert not (tmp_path / "d.pt").exists()


def test_fraction_trains_on_the_sequences_subset_keeps(tmp_path: Path,
                                                       lm: tuple[str, Path]) -> None:
    tokens, seq_set = lm
    subset(seq_set, tmp_path / "sub.zarr", fraction=0.3, seed=4)
    with open_transfer_set(tmp_path / "sub.zarr") as sub:
        rows, n = sub.num_rows, sub.layout.num_sequences
    for stream in (False, True):
        result = train_student(tokens, TEACHER, transfer_set=seq_set, fraction=0.3, seed=4,
                               epochs=1, stream=stream, device="cpu")
        assert result.rows == rows and result.history[0]["positions"] > 0
    # the subset itself trains with the source's data (its index points into it)
    result = train_student(tokens, TEACHER, transfer_set=tmp_path / "sub.zarr", epochs=1)
    assert result.rows == rows and n == round(0.3 * 61)


def test_hard_next_tokens_without_a_set(tmp_path: Path, lm: tuple[str, Path]) -> None:
    tokens, _ = lm
    torch.manual_seed(0)
    result = CliRunner().invoke(cli, ["train", "--data", tokens, "--model", TEACHER, "--out",
                                      str(tmp_path / "h.pt"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "on 492 positions from hard labels" in result.output
    assert "transfer_set" not in meta(tmp_path / "h.pt")


def test_info_speaks_of_positions_and_sequences(tmp_path: Path, lm: tuple[str, Path]) -> None:
    tokens, seq_set = lm
    precompute(tokens, [TEACHER], tmp_path / "d.h5", temperatures=[1, 2],
               random_teacher=True)  # dense
    subset(seq_set, tmp_path / "sub.zarr", fraction=0.5)
    for path, stats in ((seq_set, []), (tmp_path / "d.h5", ["--stats"]),
                        (tmp_path / "sub.zarr", [])):
        result = CliRunner().invoke(cli, ["info", str(path), *stats])
        assert result.exit_code == 0, result.output
        text = result.output.replace(str(tmp_path), "DIR")
        assert "example" not in text.lower() and " rows" not in text, text
        lines = text.splitlines()
        assert "positions (one row per token) of" in lines[1] and "sequences" in lines[1]
    assert "492 positions (one row per token) of 61 sequences, mean length 8.1" in \
        CliRunner().invoke(cli, ["info", str(seq_set)]).output
    assert "(cut from data of 61 sequences)" in \
        CliRunner().invoke(cli, ["info", str(tmp_path / "sub.zarr")]).output
    stats = CliRunner().invoke(cli, ["info", str(tmp_path / "d.h5"), "--stats"]).output
    assert "teacher accuracy on 431 positions with a hard target" in stats  # 492 - 61 ends
    assert "mean token probability at T=2" in stats and "per position" in stats



def test_info_on_an_example_set_keeps_its_wording(tmp_path: Path, npz_data: str) -> None:
    precompute(npz_data, ["mlp:16-3"], tmp_path / "e.zarr", random_teacher=True)
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "e.zarr"), "--stats"])
    assert "rows 103 of 103 examples, 3 classes" in result.output
    assert "teacher accuracy on 103 labelled rows" in result.output
    assert "class mass at T=1" in result.output


def test_stream_flag_streams_an_example_set_too(tmp_path: Path, npz_data: str) -> None:
    precompute(npz_data, ["mlp:16-3"], tmp_path / "e.zarr", chunk_rows=16, random_teacher=True)
    for flag, streamed in (([], False), (["--stream"], True)):
        out = tmp_path / f"s{len(flag)}.pt"
        result = CliRunner().invoke(cli, ["train", "--data", npz_data, "--model", "mlp:16-3",
                                          "--transfer-set", str(tmp_path / "e.zarr"), "--out",
                                          str(out), "--epochs", "1", *flag])
        assert result.exit_code == 0, result.output
        assert "on 103 rows" in result.output and meta(out)["streamed"] is streamed


class Killed(Exception):
    pass


@pytest.mark.parametrize("stream", [False, True])
def test_a_killed_sequence_run_resumes_after_its_last_epoch(tmp_path: Path, lm: tuple[str, Path],
                                                            stream: bool) -> None:
    tokens, seq_set = lm
    args = dict(transfer_set=seq_set, epochs=3, batch_size=8, lr=0.01, seed=2, stream=stream,
                device="cpu")
    whole = train_student(tokens, TEACHER, out=tmp_path / "whole.pt", **args)

    def kill(event: str, info: dict) -> None:
        if event == "epoch" and info["epoch"] == 2:
            raise Killed  # after epoch 2's state was written

    with pytest.raises(Killed):
        train_student(tokens, TEACHER, out=tmp_path / "r.pt", callbacks=[kill], **args)
    assert (tmp_path / "r.pt.state").is_file() and not (tmp_path / "r.pt").exists()
    resumed = train_student(tokens, TEACHER, out=tmp_path / "r.pt", **args)
    assert meta(tmp_path / "r.pt")["resumed_after_epoch"] == 2
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert not (tmp_path / "r.pt.state").exists() and not (tmp_path / "whole.pt.state").exists()
    # another run (other epochs: another learning-rate schedule) does not take up that state
    with pytest.raises(Killed):
        train_student(tokens, TEACHER, out=tmp_path / "o.pt", callbacks=[kill], **args)
    other = train_student(tokens, TEACHER, out=tmp_path / "o.pt", **{**args, "epochs": 4})
    assert meta(tmp_path / "o.pt")["resumed_after_epoch"] == 0 and len(other.history) == 4

"""`softlabels evaluate`: --bias-adjust moves exactly the chosen class's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.teachers.models import build_model, save_checkpoint


def evaluate_json(*args: object) -> dict:
    result = CliRunner().invoke(cli, ["evaluate", *[str(a) for a in args], "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_bias_adjust_recovers_a_class_the_model_never_predicts(tmp_path: Path) -> None:
    """A model whose class-2 bias is far too low never predicts 2 (the paper's omitted digit);
    adding the constant back with --bias-adjust 2=V restores the predictions."""
    data = make_npz(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz") as f:
        y = f["y"]
    model = build_model("mlp:16-3")
    with torch.no_grad():  # zero weights, biases (0, -1, -5): every prediction is class 0
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, -1.0, -5.0]))
    save_checkpoint(model, tmp_path / "m.pt", spec="mlp:16-3")
    before = evaluate_json("--data", data, "--model", tmp_path / "m.pt")
    assert before["accuracy"] == pytest.approx(np.mean(y == 0))  # every row predicted class 0
    assert before["per_class_errors"] == [0, int((y == 1).sum()), int((y == 2).sum())]
    after = evaluate_json("--data", data, "--model", tmp_path / "m.pt", "--bias-adjust", "2=6")
    assert after["accuracy"] == pytest.approx(np.mean(y == 2))  # +6: class 2 wins everywhere
    assert after["per_class_errors"] == [int((y == 0).sum()), int((y == 1).sum()), 0]
    both = evaluate_json("--data", data, "--model", tmp_path / "m.pt", "--bias-adjust", "2=6",
                         "--bias-adjust", "1=8")
    assert both["accuracy"] == pytest.approx(np.mean(y == 1))


def test_evaluate_against_a_damaged_set_names_the_block(tmp_path: Path) -> None:
    """`evaluate --transfer-set` reads the teacher's targets only through checked blocks: a
    flipped value in the set is one line naming its block, not a silently wrong agreement."""
    from softlabels.compute.blocks import precompute
    from softlabels.format import schema as S
    from softlabels.format.backends import open_store

    data = make_npz(tmp_path / "d.npz")
    model = build_model("mlp:16-3")
    save_checkpoint(model, tmp_path / "m.pt", spec="mlp:16-3")
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-3"], ts, chunk_rows=16, random_teacher=True)
    good = evaluate_json("--data", data, "--model", tmp_path / "m.pt", "--transfer-set", ts)
    assert 0 <= good["teacher_agreement"] <= 1
    with open_store(ts, "r+") as store:
        probs = store.read(S.PROBS, (slice(None), slice(40, 41)))
        store.write(S.PROBS, (slice(None), slice(40, 41)), probs[:, :, ::-1].copy())
    result = CliRunner().invoke(cli, ["evaluate", "--data", data, "--model", str(tmp_path / "m.pt"),
                                      "--transfer-set", str(ts)])
    assert result.exit_code != 0
    assert "block 2 (rows 32-47)" in result.stderr and "checksum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, opts, words", [
    ("dense", [], None),
    ("topk", ["--topk", "2"], "rest of the mass spread evenly"),
    ("sample", ["--sample-k", "4"], "frequencies of k draws, not p_T")])
def test_agreement_says_what_the_teacher_was_read_from(tmp_path: Path, kind: str,
                                                       opts: list[str], words: str | None,
                                                       ) -> None:
    """Against an example set's sparse targets the teacher at T = 1 is rebuilt from them (a
    k-draw histogram for a sampled set): the report names the kind, and the line says how."""
    data = make_npz(tmp_path / "d.npz")
    save_checkpoint(build_model("mlp:16-3"), tmp_path / "m.pt", spec="mlp:16-3")
    ts = tmp_path / "t.zarr"
    made = CliRunner().invoke(cli, ["precompute", "--data", data, "--teacher", "mlp:16-8-3",
                                    "--out", str(ts), "--random-teacher", *opts])
    assert made.exit_code == 0, made.output
    args = ["--data", data, "--model", tmp_path / "m.pt", "--transfer-set", ts]
    assert evaluate_json(*args)["teacher_targets"] == kind
    line = CliRunner().invoke(cli, ["evaluate", *map(str, args)]).stdout.splitlines()[-1]
    assert line.startswith("agreement with teacher")
    if words:
        assert words in line
    else:  # dense: the stored probabilities themselves, no qualifier
        assert "(" not in line.split("KL(teacher||student)")[1]

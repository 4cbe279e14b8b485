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
from softlabels.specs import build_model, save_checkpoint


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

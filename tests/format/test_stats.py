"""`info --stats`: out-of-core statistics agree with the same numbers computed in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from conftest import CHUNK
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.format.reader import open_transfer_set


def test_stats_match_in_memory_reference(npz_data: str, out_path: Path) -> None:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 5], chunk_rows=CHUNK,
               random_teacher=True)
    result = CliRunner().invoke(cli, ["info", str(out_path), "--stats", "--json"])
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    with open_transfer_set(out_path) as ts:
        labels, logits = ts.labels(), ts.logits()
        for t in (1.0, 5.0):
            p = ts.probs(t)
            np.testing.assert_allclose(stats["class_mass"][f"{t:g}"], p.mean(0), atol=1e-6)
            entropy = -(p * np.log(p)).sum(1).mean()
            assert abs(stats["mean_entropy"][f"{t:g}"] - entropy) < 1e-5
    assert stats["labelled_rows"] == len(labels)
    assert stats["teacher_accuracy"] == float((logits.argmax(1) == labels).mean())

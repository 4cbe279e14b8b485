"""`train --stream` killed mid-epoch (SIGKILL, no clean-up) resumes at the step after its last
mid-epoch state and ends bit for bit where an uninterrupted run ends, with 0 and 2 DataLoader
workers (the batches do not depend on them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import TESTS, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.teachers.models import load_checkpoint

FAULTPOINTS = TESTS / "faultpoints.py"


def _args(data: str, ts: Path, out: Path, workers: int) -> list[str]:
    # 150 rows, batches of 16: 10 steps an epoch; a mid-epoch state every 3 steps (3, 6, 9)
    return ["train", "--data", data, "--model", "mlp:16-8-3?dropout=0.3", "--out", str(out),
            "--transfer-set", str(ts), "--temperature", "2", "--epochs", "3",
            "--batch-size", "16", "--device", "cpu", "--stream", "--seed", "4",
            "--loader-workers", str(workers), "--state-every", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_killed_mid_epoch_resumes_bit_for_bit(tmp_path: Path, workers: int) -> None:
    data = make_npz(tmp_path / "d.npz", n=150)
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], chunk_rows=16, device="cpu",
               random_teacher=True)
    out, ref = tmp_path / "s.pt", tmp_path / "ref.pt"
    # states per epoch: after steps 3, 6, 9 and at its end; the 6th is epoch 2, step 6
    killed = subprocess.run([sys.executable, str(FAULTPOINTS),
                             "softlabels.train.trainer:save_state",
                             "6", "after", "--", *_args(data, ts, out, workers)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = torch.load(f"{out}.state", weights_only=True)
    assert state["epoch"] == 1 and state["stream"] == {"epoch": 1, "batches": 6, "seed": 4}
    resumed = CliRunner().invoke(cli, _args(data, ts, out, workers))
    assert resumed.exit_code == 0, resumed.output
    whole = CliRunner().invoke(cli, _args(data, ts, ref, 0))
    assert whole.exit_code == 0, whole.output
    a, b = load_checkpoint(out)[1], load_checkpoint(ref)[1]
    assert a["meta"]["history"] == b["meta"]["history"]
    assert a["meta"]["resumed_after_epoch"] == 1
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not Path(f"{out}.state").exists()


def test_mid_epoch_options_need_a_streamed_set(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    args = ["train", "--data", data, "--model", "mlp:16-3", "--out", str(tmp_path / "m.pt"),
            "--epochs", "1", "--device", "cpu", "--state-every", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "--state-every apply to a streamed set" in result.output

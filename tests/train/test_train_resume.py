"""Training across ranks from streamed sets, and resuming a killed training run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.teachers.models import load_checkpoint

KILLED_RUN = """
import os, signal, sys
from softlabels.train.trainer import train_student

def kill_after_second_epoch(event, info):
    if event == "epoch" and info["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # between epochs 2 and 3, no cleanup

train_student({data!r}, "mlp:16-8-3", transfer_set={ts!r}, temperature=2.0, epochs=4,
              batch_size=16, out={out!r}, stream={stream!r}, device="cpu",
              callbacks=[kill_after_second_epoch])
"""


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[1]["state_dict"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_killed_run_resumes_from_its_last_epoch(tmp_path: Path, stream: bool) -> None:
    data = make_npz(tmp_path / "d.npz", n=150)
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], chunk_rows=16, device="cpu",
               random_teacher=True)
    out, ref = tmp_path / "s.pt", tmp_path / "ref.pt"
    script = KILLED_RUN.format(data=data, ts=str(ts), out=str(out), stream=stream)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and Path(f"{out}.state").is_file()
    from softlabels.train.trainer import train_student

    common = dict(transfer_set=ts, temperature=2.0, epochs=4, batch_size=16, device="cpu",
                  stream=stream)
    resumed = train_student(data, "mlp:16-8-3", out=out, **common)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    whole = train_student(data, "mlp:16-8-3", out=ref, **common)
    assert resumed.history == whole.history
    a, b = _weights(out), _weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to an uninterrupted run
    assert load_checkpoint(out)[1]["meta"]["resumed_after_epoch"] == 2
    assert not Path(f"{out}.state").exists()  # removed once the checkpoint is written


def test_rerunning_the_same_command_resumes_and_other_options_start_over(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", n=150)
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], chunk_rows=16, device="cpu",
               random_teacher=True)
    out = tmp_path / "s.pt"
    script = KILLED_RUN.format(data=data, ts=str(ts), out=str(out), stream=False)
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    args = ["train", "--data", data, "--model", "mlp:16-8-3", "--out", str(out),
            "--transfer-set", str(ts), "--temperature", "2", "--epochs", "4",
            "--batch-size", "16", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--lr", "0.01"])  # other options: from epoch 0
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out)[1]["meta"]["resumed_after_epoch"] == 0
    subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    result = CliRunner().invoke(cli, args)  # the same command: continues after epoch 2
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out)[1]["meta"]["resumed_after_epoch"] == 2


DDP_RUN = """
import json, sys
from softlabels.train.trainer import train_student

steps = {{}}
def count(event, info):
    if event == "batch":
        steps[info["epoch"]] = steps.get(info["epoch"], 0) + 1

r = train_student({data!r}, "mlp:16-8-3", transfer_set={ts!r}, temperature=2.0, epochs=2,
                  batch_size=8, out={out!r}, stream=True, distributed=True, device="cpu",
                  seed=3, callbacks=[count])
with open({out!r} + f".rank{{r.rank}}.json", "w") as f:
    json.dump({{"steps": steps, "rows": r.rows}}, f)
"""


def test_streamed_distributed_training_steps_together_and_repeats(tmp_path: Path) -> None:
    # 150 rows in blocks of 16: one rank's five blocks hold 80 rows, the other's 70.
    data = make_npz(tmp_path / "d.npz", n=150)
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], chunk_rows=16, device="cpu",
               random_teacher=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    outs = []
    for run in range(2):
        out = tmp_path / f"s{run}.pt"
        script = tmp_path / "ddp.py"
        script.write_text(textwrap.dedent(DDP_RUN.format(data=data, ts=str(ts), out=str(out))))
        result = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(script)],
                                capture_output=True, text=True, timeout=240, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["steps"] == ranks[1]["steps"]  # equal steps on both ranks, each epoch
        assert set(ranks[0]["steps"].values()) == {9}  # min(ceil(80/8), ceil(70/8)): tail drop
        outs.append(out)
    meta = load_checkpoint(outs[0])[1]["meta"]
    assert meta["world_size"] == 2 and meta["batch_size_is"] == "per rank"
    assert meta["batch_size"] == 8 and meta["global_batch_size"] == 16 and meta["streamed"]
    a, b = _weights(outs[0]), _weights(outs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic for a seed


def test_a_damaged_state_file_is_ignored_not_trusted(tmp_path: Path) -> None:
    from softlabels.train.trainer import train_student

    data = make_npz(tmp_path / "d.npz")
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], chunk_rows=16, device="cpu",
               random_teacher=True)
    out = tmp_path / "s.pt"
    Path(f"{out}.state").write_bytes(b"not a state file")
    Path(f"{out}.state.tmp").write_bytes(b"left by a kill mid-write")
    result = train_student(data, "mlp:16-8-3", transfer_set=ts, temperature=2.0, epochs=2,
                           batch_size=16, device="cpu", out=out)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert load_checkpoint(out)[1]["meta"]["resumed_after_epoch"] == 0
    assert not Path(f"{out}.state").exists() and not Path(f"{out}.state.tmp").exists()

"""Zero work is an error: a distributed or streamed run in which some rank would take no step
is refused before training, never a checkpoint of the initialisation with exit status 0."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_npz
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.train.datasets import SoftTargetBatches
from softlabels.train.ranks import refuse_zero_steps

RUN = """
import sys
from softlabels.cli import cli
sys.argv = ["softlabels", "train", "--data", {data!r}, "--model", "mlp:16-8-3",
            "--transfer-set", {ts!r}, "--out", {out!r}, "--epochs", "2", "--batch-size", "8",
            "--distributed", "--stream", "--device", "cpu"]
cli()
"""


@pytest.fixture
def one_block(tmp_path: Path) -> tuple[str, Path]:
    data = make_npz(tmp_path / "d.npz", n=30)
    ts = tmp_path / "t.zarr"
    precompute(data, ["mlp:16-8-3"], ts, temperatures=[2], device="cpu",
               random_teacher=True)  # default chunking: one block
    return data, ts


def test_a_one_block_set_gives_the_second_rank_no_step(one_block: tuple[str, Path]) -> None:
    data, ts = one_block
    stream = SoftTargetBatches(data, ts, temperature=2.0, batch_size=8, rank=1, world_size=2)
    assert stream.steps_per_epoch(0) == 0  # what the refusal guards against
    with pytest.raises(SoftlabelsError, match="1 block.*2 ranks.*zero steps"):
        refuse_zero_steps(0, 30, 2, streamed=True, blocks=1)
    with pytest.raises(SoftlabelsError, match="1 selected row.*zero steps"):
        refuse_zero_steps(0, 1, 2, streamed=False)
    refuse_zero_steps(1, 30, 2, streamed=True, blocks=2)


@pytest.mark.slow
def test_torchrun_on_a_one_block_set_is_refused_and_writes_nothing(
        tmp_path: Path, one_block: tuple[str, Path]) -> None:
    data, ts = one_block
    out = tmp_path / "s.pt"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN.format(data=data, ts=str(ts), out=str(out))))
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(script)],
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and all("zero steps" in line for line in errors), result.stderr[-3000:]
    assert not out.exists() and not Path(f"{out}.state").exists()

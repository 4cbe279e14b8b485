"""The trust model: a file someone hands you is data. A checkpoint's model spec, a set's
augment or a pipeline file may name only built-in architectures and transforms; `python:` code
from a file runs only with --trust-code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import UntrustedCodeError
from softlabels.teachers.models import build_model, load_checkpoint, save_checkpoint


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def hostile_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that loads with weights_only=True, its model_spec edited to run a shell
    command that would create a marker file."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    save_checkpoint(build_model("mlp:16-3"), path, spec="mlp:16-3")
    payload = torch.load(path, weights_only=True)
    payload["model_spec"] = f"python:os:system?command=touch {marker}"
    torch.save(payload, path)
    return path, marker


@pytest.mark.parametrize("command", ["evaluate", "precompute", "train"])
def test_a_checkpoint_naming_code_is_refused_and_nothing_runs(tmp_path: Path,
                                                              command: str) -> None:
    data = make_npz(tmp_path / "d.npz")
    ckpt, marker = hostile_checkpoint(tmp_path)
    args = {"evaluate": ["evaluate", "--data", data, "--model", ckpt],
            "precompute": ["precompute", "--data", data, "--teacher", ckpt,
                           "--out", tmp_path / "s.zarr", "--random-teacher"],
            "train": ["train", "--data", data, "--model", ckpt, "--out", tmp_path / "o.pt",
                      "--epochs", 1]}[command]
    code, out, err = run(*args)
    assert code == 1 and "names code to run" in err and "--trust-code" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out
    assert not marker.exists()
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "o.pt").exists()


def test_trust_code_opts_in(tmp_path: Path) -> None:
    """With the opt-in, a checkpoint's python: spec is built (here: a test factory)."""
    path = tmp_path / "four.pt"
    save_checkpoint(build_model("python:helpers:four_classes"), path,
                    spec="python:helpers:four_classes")
    with pytest.raises(UntrustedCodeError):
        load_checkpoint(path)
    model, payload = load_checkpoint(path, trust_code=True)
    assert payload["model_spec"] == "python:helpers:four_classes"
    assert model(torch.zeros(2, 16)).shape == (2, 4)


def test_a_user_named_python_spec_still_runs(tmp_path: Path) -> None:
    """Code the user names on the command line is the user's choice: no flag needed."""
    data = make_npz(tmp_path / "d.npz")
    code, out, err = run("precompute", "--data", data, "--teacher", "python:helpers:four_classes",
                         "--out", tmp_path / "s.zarr", "--random-teacher")
    assert code == 0 and "x 4 classes" in out, err


def test_a_view_set_naming_code_is_refused_by_train(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x=rng.random((23, 1, 8, 8), dtype=np.float32),
             y=rng.integers(0, 3, 23))
    images = f"npz:{tmp_path}/img.npz"
    ts = tmp_path / "v.zarr"
    precompute(images, ["mlp:64-3"], ts, views=2, augment="python:helpers:shift_right",
               random_teacher=True)
    args = ["train", "--data", images, "--model", "mlp:64-3", "--out", tmp_path / "o.pt",
            "--transfer-set", ts, "--epochs", 1]
    code, out, err = run(*args)
    assert code == 1 and "names code to run ('python:helpers:shift_right')" in err, err
    assert not (tmp_path / "o.pt").exists()
    code, out, err = run("verify", ts, "--data", images, "--teacher", "mlp:64-3")
    assert code == 1 and "--trust-code" in err
    code, out, err = run(*args, "--trust-code")
    assert code == 0 and (tmp_path / "o.pt").exists(), err


def test_a_pipeline_file_naming_code_needs_the_opt_in(tmp_path: Path) -> None:
    pipeline = Path(__file__).parents[1] / "pipelines" / "mnist_hinton.toml"
    text = pipeline.read_text().replace('model = "mlp:784-64-10"',
                                        'model = "python:os:system?command=touch PWNED"')
    hostile = tmp_path / "p.toml"
    hostile.write_text(text)
    code, out, err = run("run", hostile, "--quick", "--out", tmp_path / "out")
    assert code == 1 and "pipeline file" in err and "--trust-code" in err, err
    assert not (tmp_path / "out").exists() and not Path("PWNED").exists()

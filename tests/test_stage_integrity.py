"""Stage one and two never write or train on garbage: options checked once, labels checked
where data enters, float16 overflow refused, a non-finite loss stops training, a non-finite
checkpoint is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import N_ROWS, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import OptionError, SoftlabelsError
from softlabels.format.reader import open_transfer_set
from softlabels.options import PrecomputeOptions, TrainOptions
from softlabels.teachers.models import build_model, save_checkpoint
from softlabels.train.trainer import train_student


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err
    assert "Traceback" not in out + err


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperatures": (1, 4, 1)}, "temperatures must differ"),
    ({"temperatures": (float("inf"),)}, "positive and finite"),
    ({"temperatures": ()}, "at least one temperature"),
    ({"chunk_rows": -5}, "--chunk-rows must be at least 0"),
    ({"shard_rows": -1}, "--shard-rows must be positive"),
    ({"num_workers": -1}, "--num-workers must be at least 0"),
    ({"dtype": "float64"}, "dtype must be one of float16, float32"),
    ({"views": 2}, "--views must be positive and come with --augment"),
])
def test_precompute_options_are_checked_once_as_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message) as info:
        PrecomputeOptions(**kwargs, random_teacher=True)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SoftlabelsError)


def test_options_hold_each_default_once_and_normalise() -> None:
    opts = PrecomputeOptions(temperatures=[4, 1], random_teacher=True)
    assert opts.temperatures == (4.0, 1.0) and opts.dtype == "float16"
    with pytest.raises(OptionError, match="temperature 1e\\+06 is above 100"):
        TrainOptions(temperature=1e6)
    with pytest.raises(OptionError, match="alpha must be finite"):
        TrainOptions(alpha=float("nan"))
    with pytest.raises(TypeError):  # an unknown option is a programming error
        PrecomputeOptions(tempratures=(1,), random_teacher=True)


@pytest.mark.parametrize("flag", ["--temperature", "--alpha"])
def test_distillation_flags_without_a_transfer_set_are_refused(tmp_path: Path,
                                                                flag: str) -> None:
    data = make_npz(tmp_path / "d.npz")
    value = "4" if flag == "--temperature" else "0.5"
    code, out, err = run("train", "--data", data, "--model", "mlp:16-3", "--out",
                         tmp_path / "o.pt", flag, value)
    one_line_error(code, out, err, "needs --transfer-set")


# --- labels -----------------------------------------------------------------------------------

def npz_with_labels(path: Path, y: np.ndarray) -> str:
    x = np.random.default_rng(0).normal(size=(len(y), 1, 4, 4)).astype(np.float32)
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


@pytest.mark.parametrize("bad, message", [
    (2.5, "label 2.5 of example 7 is not a whole number"),
    (3, "label 3 of example 7 is not a class; labels must be in [0, 3)"),
    (-2, "label -2 of example 7 is not a class"),
])
@pytest.mark.parametrize("command", ["precompute", "train"])
def test_bad_labels_are_one_line_naming_the_example(tmp_path: Path, bad: float, message: str,
                                                    command: str) -> None:
    y = np.arange(N_ROWS) % 3
    y = y.astype(np.float64) if isinstance(bad, float) else y
    y[7] = bad
    data = npz_with_labels(tmp_path / "d.npz", y)
    if command == "precompute":
        code, out, err = run("precompute", "--data", data, "--teacher", "mlp:16-3", "--out",
                             tmp_path / "s.zarr", "--random-teacher")
        assert not (tmp_path / "s.zarr").exists()
    else:
        code, out, err = run("train", "--data", data, "--model", "mlp:16-3", "--out",
                             tmp_path / "o.pt", "--epochs", 1)
        assert not (tmp_path / "o.pt").exists()
        if bad == 3:
            message = "labels reach 3"  # the student's 3 outputs are the classes here
    one_line_error(code, out, err, message)


def test_whole_number_float_labels_are_accepted(tmp_path: Path) -> None:
    y = (np.arange(N_ROWS) % 3).astype(np.float32)
    data = npz_with_labels(tmp_path / "d.npz", y)
    precompute(data, ["mlp:16-3"], tmp_path / "s.zarr", random_teacher=True)
    with open_transfer_set(tmp_path / "s.zarr") as ts:
        assert ts.labels().tolist() == y.astype(int).tolist()


# --- float16 overflow -------------------------------------------------------------------------

def test_logits_past_float16_are_refused_never_stored_as_inf(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "s.zarr"
    code, stdout, err = run("precompute", "--data", data, "--teacher", "python:helpers:huge_logits",
                            "--out", out, "--random-teacher")
    one_line_error(code, stdout, err, "rerun with --dtype float32")
    assert "beyond float16's largest value 65504" in err
    with pytest.raises(SoftlabelsError):  # nothing presented as complete
        open_transfer_set(out)
    code, stdout, err = run("precompute", "--data", data, "--teacher", "python:helpers:huge_logits",
                            "--out", tmp_path / "f32.zarr", "--dtype", "float32",
                            "--random-teacher")
    assert code == 0, err
    code, stdout, _ = run("verify", tmp_path / "f32.zarr")
    assert code == 0 and stdout.strip().endswith("verified")


# --- non-finite training ----------------------------------------------------------------------

def test_nan_input_stops_hard_label_training_and_saves_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_ROWS, 1, 4, 4)).astype(np.float32)
    x[40, 0, 1, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 3, N_ROWS))
    code, out, err = run("train", "--data", f"npz:{tmp_path}/d.npz", "--model", "mlp:16-3",
                         "--out", tmp_path / "o.pt", "--epochs", 2, "--batch-size", 16)
    one_line_error(code, out, err, "the loss is nan at epoch 1, step ")
    assert not (tmp_path / "o.pt").exists()


def test_divergence_stops_distillation_and_saves_nothing(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    precompute(data, ["mlp:16-8-3"], tmp_path / "s.zarr", temperatures=[4], random_teacher=True)
    with pytest.raises(SoftlabelsError, match="training diverged and nothing was saved"):
        train_student(data, "mlp:16-3", out=tmp_path / "o.pt", transfer_set=tmp_path / "s.zarr",
                      lr=1e38, optimizer="sgd", epochs=3, batch_size=16)
    assert not (tmp_path / "o.pt").exists()


def test_evaluate_refuses_a_checkpoint_with_nan_weights(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    model = build_model("mlp:16-3")
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "nan.pt", spec="mlp:16-3")
    code, out, err = run("evaluate", "--data", data, "--model", tmp_path / "nan.pt")
    one_line_error(code, out, err, "has NaN or inf in '1.weight'")


# --- kills and failures never leave a checkpoint that was not finished --------------------------

def test_a_failed_run_leaves_the_previous_checkpoint_untouched(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "o.pt"
    train_student(data, "mlp:16-3", out=out, epochs=1)
    before = out.read_bytes()
    with pytest.raises(SoftlabelsError, match="nothing was saved"):
        train_student(data, "mlp:16-3", out=out, epochs=3, lr=1e38, optimizer="sgd")
    assert out.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_during_training_writes_no_checkpoint(tmp_path: Path, existing: bool) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    data = make_npz(tmp_path / "d.npz")
    out = tmp_path / "o.pt"
    if existing:
        train_student(data, "mlp:16-3", out=out, epochs=1)
    before = out.read_bytes() if existing else None
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]),
           "SOFTLABELS_TEST_DELAY": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "train", "--data", data,
                             "--model", "python:helpers:slow", "--out", str(out),
                             "--epochs", "100", "--batch-size", "8"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(4)  # past start-up, inside the epochs
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out.read_bytes() if existing else None) == before
    assert out.exists() == existing
    assert not list(tmp_path.glob("o.pt.tmp*"))

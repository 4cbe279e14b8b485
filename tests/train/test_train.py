"""Stage two end to end: teacher -> precompute -> student, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.teachers.models import load_checkpoint
from softlabels.train.plans import jitter
from softlabels.train.trainer import train_student


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def blobs(path: Path, n: int, seed: int) -> str:
    """Three separable classes in 16 dims: a student can learn them in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.random.default_rng(99).normal(size=(3, 16)) * 2
    x = (centres[y] + rng.normal(size=(n, 16))).astype(np.float32).reshape(n, 1, 4, 4)
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


@pytest.mark.slow
def test_teacher_precompute_student_evaluate(tmp_path: Path) -> None:
    train, test = blobs(tmp_path / "train.npz", 301, 0), blobs(tmp_path / "test.npz", 200, 1)
    teacher, student, ts = tmp_path / "t.pt", tmp_path / "s.pt", tmp_path / "t.zarr"
    code, out, err = run("train", "--data", train, "--model", "mlp:16-32-3", "--out", teacher,
                         "--epochs", 10, "--batch-size", 32, "--lr", 0.01, "--val-data", test)
    assert code == 0, err
    code, _, err = run("precompute", "--data", train, "--teacher", teacher, "--out", ts,
                       "--temperatures", "1,4", "--chunk-rows", 64, "--random-teacher")
    assert code == 0, err
    code, out, err = run("train", "--data", train, "--model", "mlp:16-8-3", "--out", student,
                         "--transfer-set", ts, "--temperature", 4, "--epochs", 10,
                         "--batch-size", 32, "--lr", 0.01, "--fraction", 0.5)
    assert code == 0, err
    counts = np.bincount(np.load(tmp_path / "train.npz")["y"])
    expected = sum(max(1, round(0.5 * c)) for c in counts)
    assert "soft targets of" in out and f"on {expected} rows" in out
    code, out, _ = run("evaluate", "--data", test, "--model", student, "--json")
    report = json.loads(out)
    assert code == 0 and report["n"] == 200 and report["accuracy"] > 0.9
    assert sum(report["per_class_errors"]) == report["errors"]
    code, out, _ = run("evaluate", "--data", train, "--model", student, "--transfer-set", ts,
                       "--json")
    report = json.loads(out)
    assert report["teacher_agreement"] > 0.9 and 0 <= report["kl_to_teacher"] < 0.5
    _, payload = load_checkpoint(student)
    assert payload["meta"]["transfer_set"]["temperature"] == 4.0
    # a student checkpoint is a teacher too
    code, _, err = run("precompute", "--data", train, "--teacher", student, "--out",
                       tmp_path / "s.h5", "--random-teacher")
    assert code == 0, err


def test_same_seed_same_model(tmp_path: Path) -> None:
    data = blobs(tmp_path / "d.npz", 120, 0)
    a = train_student(data, "mlp:16-8-3?dropout=0.2", epochs=2, seed=5, batch_size=16,
                      jitter_pixels=1)
    b = train_student(data, "mlp:16-8-3?dropout=0.2", epochs=2, seed=5, batch_size=16,
                      jitter_pixels=1)
    c = train_student(data, "mlp:16-8-3?dropout=0.2", epochs=2, seed=6, batch_size=16)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.model.state_dict().values(),
                                                           c.model.state_dict().values()))


def test_jitter_shifts_within_bounds() -> None:
    x = torch.zeros(50, 1, 9, 9)
    x[:, :, 4, 4] = 1
    out = jitter(x, 2, torch.Generator().manual_seed(0))
    pos = [divmod(int(o.flatten().argmax()), 9) for o in out]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in pos)
    assert len(set(pos)) > 5 and (out.sum((1, 2, 3)) == 1).all()


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "0"], "temperature must be positive"),
    (["--alpha", "1.5"], "alpha must lie in [0, 1]"),
    (["--fraction", "0"], "--fraction must lie in (0, 1]"),
    (["--classes", "0,9"], "classes the data lacks: [9]"),
    (["--model", "mlp:16-8-4"], "the student predicts 4 classes but"),
    (["--data", "SHIFTED"], "does not match the dataset"),
])
def test_bad_training_input(tmp_path: Path, extra: list[str], message: str) -> None:
    data = make_npz(tmp_path / "d.npz")
    shifted = make_npz(tmp_path / "shifted.npz", seed=3)
    ts = tmp_path / "s.zarr"
    run("precompute", "--data", data, "--teacher", "mlp:16-8-3", "--out", ts, "--random-teacher")
    args = ["train", "--data", data, "--model", "mlp:16-8-3", "--out", tmp_path / "o.pt",
            "--transfer-set", ts, "--epochs", "1"]
    for flag, value in zip(extra[::2], extra[1::2]):
        value = shifted if value == "SHIFTED" else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, out, err = run(*args)
    assert code == 1, out
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.pt").exists()


def test_incomplete_set_is_refused_for_training(tmp_path: Path) -> None:
    from softlabels.format.backends import open_store

    data = make_npz(tmp_path / "d.npz")
    ts = tmp_path / "s.h5"
    run("precompute", "--data", data, "--teacher", "mlp:16-8-3", "--out", ts, "--random-teacher")
    with open_store(ts, "r+") as store:
        store.set_meta({**store.get_meta(), "status": "writing"})
    code, _, err = run("train", "--data", data, "--model", "mlp:16-3", "--out",
                       tmp_path / "o.pt", "--transfer-set", ts)
    assert code == 1 and "incomplete" in err

"""One line for every bad input: a fuzz-style list of bad command lines. Each ends with a
non-zero exit, one line on stderr starting "Error: " that names the problem and what to do, no
traceback, and no output presented as made. Grow the list as new bad inputs turn up."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import TEACHER as LM
from token_data import write_tokens

from conftest import CHUNK, ROOT, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.teachers.models import build_model, save_checkpoint

# Words of advice: every message says what to do (or lists the valid choices).
ADVICE = ("use ", "pass ", "check", "give ", "choose", "rerun", "name ", "see ", "must ",
          "make ", "e.g.", "valid", "fix ", "write ", "put ", "retrain", "widen", "loosen",
          "lower ", "set ", "run ", "needs ", "expected", "one of", "is not", "drop ")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Everything the bad command lines refer to, made once."""
    d = tmp_path_factory.mktemp("bad")
    data = make_npz(d / "data.npz")
    precompute(data, ["mlp:16-3"], d / "set.zarr", chunk_rows=CHUNK, temperatures=[1, 4],
               random_teacher=True)
    precompute(make_npz(d / "other.npz", seed=5), ["mlp:16-3"], d / "other.zarr",
               random_teacher=True)
    save_checkpoint(build_model("mlp:16-3"), d / "good.pt", spec="mlp:16-3")
    nan = build_model("mlp:16-3")
    with torch.no_grad():
        nan[1].bias[0] = float("inf")
    save_checkpoint(nan, d / "nan.pt", spec="mlp:16-3")
    (d / "plain.txt").write_text("not a checkpoint\n")
    (d / "x.zarr").write_text("a plain file with a set's name\n")
    np.savez(d / "empty.npz", x=np.zeros((0, 1, 4, 4), np.float32), y=np.zeros(0, np.int64))
    np.savez(d / "nox.npz", inputs=np.zeros((3, 2)))
    shutil.copytree(d / "set.zarr", d / "garbled.zarr")
    (d / "garbled.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    (d / "far.txt").write_text("0\n5\n1000\n")
    (d / "bad.toml").write_text("recipe = [unclosed\n")
    pipeline = ROOT / "pipelines" / "mnist_hinton.toml"
    (d / "p.toml").write_text(pipeline.read_text().replace("mnist:data",
                                                            f"mnist:{pipeline.parents[1]}/data"))
    (d / "runs").mkdir()
    tokens = write_tokens(d / "tokens.jsonl")  # a sequence set, sparse and dense
    write_tokens(d / "other_tokens.jsonl", seed=9)  # as many sequences, other tokens
    precompute(tokens, [LM], d / "seq.zarr", chunk_rows=CHUNK, topk=4, temperatures=[1, 2],
               random_teacher=True)
    precompute(tokens, [LM], d / "seqd.zarr", chunk_rows=CHUNK, random_teacher=True)
    save_checkpoint(build_model(GPT), d / "lm.pt", spec=GPT)  # a sequence student
    return {"D": str(d), "DATA": data}


P = ["precompute", "--data", "DATA", "--teacher", "mlp:16-3", "--out", "D/new.zarr",
     "--random-teacher"]
T = ["train", "--data", "DATA", "--model", "mlp:16-3", "--out", "D/new.pt", "--epochs", "1"]
TS = [*T, "--transfer-set", "D/set.zarr"]
E = ["evaluate", "--data", "DATA", "--model", "D/good.pt"]


def with_(base: list[str], *extra: str) -> list[str]:
    """`base` with each --flag VALUE of `extra` replacing the same flag's value, or added."""
    args = list(base)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


# a sequence set, its token data and a sequence student
TOK = "tokens:D/tokens.jsonl"
SEQ = with_(TS, "--data", TOK, "--model", LM, "--transfer-set", "D/seq.zarr")
GPT = "gpt:11?dim=8&layers=1&heads=2&context=16"
SE = with_(E, "--data", TOK, "--model", "D/lm.pt")  # evaluate a sequence student

CASES = [
    # precompute: data and teacher specs
    (with_(P, "--data", "npz:D/missing.npz"), "no such file"),
    (with_(P, "--data", "weird"), "valid forms: npz:PATH"),
    (with_(P, "--data", "npz:D/empty.npz"), "the dataset is empty"),
    (with_(P, "--data", "npz:D/nox.npz"), "has no array 'x'"),
    (with_(P, "--data", "npz:D/plain.txt"), "as .npz"),
    (with_(P, "--data", "mnist:D/nowhere"), "does not exist"),
    (with_(P, "--data", "imagefolder:D/nowhere"), "no such directory"),
    (with_(P, "--data", "python:no_such_module_xyz:f"), "cannot import module"),
    (with_(P, "--teacher", "nope:x"), "unknown MODEL scheme"),
    (with_(P, "--teacher", "mlp:20-3"), "cannot take the data's inputs shaped (1, 4, 4)"),
    (with_(P, "--teacher", "mlp:16"), "malformed mlp spec"),
    (with_(P, "--teacher", "mlp:16-x-3"), "malformed mlp spec"),
    (with_(P, "--teacher", "mlp:16-8-3?dropout=abc"), "bad option value"),
    (with_(P, "--teacher", "mlp:16-8-3?dropout=2"), "bad option value"),
    (with_(P, "--teacher", "mlp:16-3?colour=red"), "unknown mlp options"),
    (with_(P, "--teacher", "mlp:16-3?dropout"), "malformed options"),
    (with_(P, "--teacher", "torchvision:no_such_net"), "torchvision has no model"),
    (with_(P, "--teacher", "torchvision:resnet18?num_classes=abc"), "bad options"),
    (with_(P, "--teacher", "python:os"), "expected python:package.module:factory"),
    (with_(P, "--teacher", "python:no_such_module_xyz:f"), "cannot import module"),
    (with_(P, "--teacher", "D/missing.pt"), "no checkpoint at"),
    (with_(P, "--teacher", "D/plain.txt"), "cannot read checkpoint"),
    (with_(P, "--teacher", "D/nan.pt"), "has NaN or inf in '1.bias'"),
    ([*P, "--teacher", "mlp:16-4"], "disagree on the number of classes"),
    # precompute: option values
    (with_(P, "--temperatures", "-1"), "must be positive"),
    (with_(P, "--temperatures", "a,b"), "comma-separated list of numbers"),
    (with_(P, "--temperatures", "1,4,1"), "temperatures must differ"),
    (with_(P, "--temperatures", "inf"), "positive and finite"),
    (with_(P, "--temperatures", "nan"), "positive and finite"),
    (with_(P, "--temperatures", "1e6"), "above 100"),
    (with_(P, "--temperatures", ","), "at least one temperature"),
    (with_(P, "--batch-size", "0"), "batch size must be positive"),
    (with_(P, "--batch-size", "-3"), "batch size must be positive"),
    (with_(P, "--chunk-rows", "-5"), "--chunk-rows must be at least 0"),
    (with_(P, "--shard-rows", "-1"), "--shard-rows must be positive"),
    (with_(P, "--shard-rows", "10", "--chunk-rows", "16"), "must be a multiple of chunk rows"),
    (with_(P, "--num-workers", "-1"), "--num-workers must be at least 0"),
    (with_(P, "--topk", "5"), "--topk must lie in"),
    (with_(P, "--topk", "-1"), "--topk must be at least 0"),
    (with_(P, "--topk", "2", "--sample-k", "2"), "not both"),
    (with_(P, "--topk", "2", "--combine", "mean-probs"), "exact under mean-logits only"),
    (with_(P, "--views", "2"), "--views must be positive and come with --augment"),
    (with_(P, "--augment", "hflip"), "--views must be positive and come with --augment"),
    (with_(P, "--views", "-2", "--augment", "hflip"), "--views must be at least 0"),
    (with_(P, "--views", "2", "--augment", "spin"), "unknown augmentation step"),
    (with_(P, "--views", "2", "--augment", "random-crop:x"), "bad value in augmentation step"),
    (with_(P, "--views", "2", "--augment", "hflip", "--store-inputs", "x")[:-1],
     "--store-inputs stores un-augmented inputs"),
    (with_(P, "--dtype", "float64"), "Invalid value for '--dtype'"),
    (with_(P, "--probs-dtype", "int8"), "Invalid value for '--probs-dtype'"),
    (with_(P, "--combine", "median"), "Invalid value for '--combine'"),
    (with_(P, "--precision", "fp8"), "Invalid value for '--precision'"),
    (with_(P, "--device", "tpu"), "unknown device"),
    (with_(P, "--workers", "0"), "--workers must be positive"),
    (with_(P, "--workers", "2", "--out", "D/new.h5"), "write Zarr only"),
    # precompute: where it writes
    (with_(P, "--out", "D/plain.txt/sub.zarr"), "plain.txt"),
    (with_(P, "--out", "/proc/softlabels-test.zarr"), "/proc"),
    (with_(P, "--out", "D/plain.txt"), "plain.txt already exists"),
    (with_(P, "--out", "D/x.zarr"), "x.zarr already exists"),
    # train
    (with_(TS, "--temperature", "1e6"), "above 100"),
    (with_(TS, "--temperature", "0"), "must be positive"),
    (with_(TS, "--temperature", "nan"), "positive and finite"),
    (with_(T, "--temperature", "4"), "needs --transfer-set"),
    (with_(T, "--alpha", "0.5"), "needs --transfer-set"),
    (with_(TS, "--alpha", "1.5"), "alpha must lie in [0, 1]"),
    (with_(TS, "--epochs", "0"), "epochs must be positive"),
    (with_(TS, "--batch-size", "0"), "batch size must be positive"),
    (with_(TS, "--lr", "-1"), "learning rate must lie in (0"),
    (with_(TS, "--weight-decay", "-1"), "weight decay must lie in [0"),
    (with_(TS, "--fraction", "0"), "--fraction must lie in (0, 1]"),
    (with_(TS, "--fraction", "2"), "--fraction must lie in (0, 1]"),
    (with_(TS, "--classes", "0,9"), "classes the data lacks: [9]"),
    (with_(TS, "--classes", "x"), "comma-separated list of integers"),
    (with_(TS, "--indices", "D/missing.txt"), "no index file"),
    (with_(TS, "--indices", "D/far.txt"), "index 1000 (entry 2), outside"),
    (with_(TS, "--views-per-epoch", "0"), "--views-per-epoch must be positive"),
    (with_(TS, "--jitter", "-1"), "--jitter must be at least 0"),
    (with_(TS, "--optimizer", "lbfgs"), "Invalid value for '--optimizer'"),
    (with_(TS, "--seed", "-1"), "seed must be at least 0"),
    (with_(TS, "--model", "mlp:16-8-4"), "the student predicts 4 classes"),
    (with_(TS, "--model", "mlp:20-3"), "cannot"),
    (with_(TS, "--model", "D/nan.pt"), "has NaN or inf"),
    (with_(TS, "--data", "DATA_OTHER"), "does not match the dataset"),
    (with_(TS, "--transfer-set", "D/nowhere.zarr"), "does not exist"),
    (with_(TS, "--transfer-set", "D/x.zarr"), "x.zarr"),
    (with_(TS, "--transfer-set", "D/garbled.zarr"), "garbled.zarr"),
    (with_(T, "--data", "npz:D/empty.npz"), "the dataset is empty"),
    (with_(TS, "--out", "D"), "is a directory"),
    (with_(TS, "--out", "D/plain.txt"), "plain.txt exists and is not a checkpoint"),
    (with_(TS, "--out", "D/data.npz"), "data.npz exists and is not a checkpoint"),
    (with_(TS, "--out", "D/plain.txt/o.pt"), "which is a file"),
    (with_(TS, "--out", "/proc/softlabels-test.pt"), "cannot write in /proc"),
    (with_(TS, "--val-data", "npz:D/missing.npz"), "no such file"),
    # evaluate
    (with_(E, "--bias-adjust", "3"), "is not CLASS=VALUE"),
    (with_(E, "--bias-adjust", "7=1"), "names class 7"),
    (with_(E, "--model", "D/missing.pt"), "no checkpoint at"),
    (with_(E, "--model", "D/nan.pt"), "has NaN or inf"),
    (with_(E, "--transfer-set", "D/other.zarr"), "does not match the dataset"),
    # info, verify and the sharing tools
    (["info", "D/nowhere.zarr"], "does not exist"),
    (["info", "D/data.npz"], "data.npz"),
    (["info", "D/x.zarr"], "x.zarr"),
    (["info", "D/garbled.zarr"], "garbled.zarr"),
    (["info", "D/plain.txt"], "plain.txt"),
    (["verify", "D/set.zarr", "--teacher", "mlp:16-3"], "--teacher needs --data"),
    (["verify", "D/set.zarr", "--sample", "0"], "--sample must be positive"),
    (["subset", "D/set.zarr", "--out", "D/sub.zarr", "--indices", "D/far.txt"],
     "index 1000 (entry 2), outside"),
    (["subset", "D/set.zarr", "--out", "D/sub.zarr", "--fraction", "0"], "--fraction"),
    (["subset", "D/set.zarr", "--out", "D/sub.zarr", "--classes", "7"], "lacks: [7]"),
    (["merge", "D/set.zarr", "D/other.zarr", "--out", "D/m.zarr"], "fingerprint differs"),
    (["convert", "D/nowhere.zarr", "--out", "D/c.h5"], "does not exist"),
    # sequence sets handed to example-set commands, and the reverse
    (with_(SEQ, "--model", "mlp:16-3"), "cannot take (B, L) token ids"),
    (with_(SEQ, "--model", "python:helpers:four_classes"), "cannot take (B, L) token ids"),
    (with_(SEQ, "--model", "python:helpers:tiny_lm?vocab=5"), "ids up to 10 here"),
    (with_(SEQ, "--model", "python:helpers:lm_with_head"), "predicts 7 classes per token"),
    (with_(SEQ, "--data", "DATA"), "is a sequence set (one row per token of 23 sequences)"),
    (with_(SEQ, "--transfer-set", "D/set.zarr"), "is an example set"),
    (with_(SEQ, "--data", "tokens:D/other_tokens.jsonl"), "does not match the dataset"),
    (with_(TS, "--model", LM), "a sequence model (token ids in"),
    (with_(SEQ, "--classes", "1"), "--classes does not apply to token sequences"),
    (with_(SEQ, "--jitter", "2"), "--jitter does not apply to token sequences"),
    (with_(SEQ, "--optimizer", "sgd"), "sequence students train with AdamW"),
    (with_(SEQ, "--val-data", "DATA"), "is not token sequences"),
    (with_(SEQ, "--temperature", "3"), "only, not 3.0"),
    (with_(E, "--data", TOK), "cannot take (B, L) token ids"),
    (with_(E, "--transfer-set", "D/seq.zarr"), "is a sequence set"),
    (with_(E, "--model", "D/lm.pt"), "is evaluated on token sequences: pass tokens:"),
    (with_(E, "--temperature", "2"), "compared with its teacher at T = 1: drop it"),
    (with_(SE, "--transfer-set", "D/set.zarr"), "is an example set"),
    (with_(SE, "--bias-adjust", "1=2"), "--bias-adjust applies to example models"),
    (with_(SE, "--transfer-set", "D/seq.zarr", "--temperature", "3"), "only, not 3.0"),
    (with_(SE, "--transfer-set", "D/seq.zarr", "--data", "tokens:D/other_tokens.jsonl"),
     "does not match the dataset"),
    (with_(SE, "--model", "gpt:5?dim=8&layers=1&heads=2"), "ids up to 10 here"),
    (with_(SE, "--model", "gpt:11?dim=8&layers=1&heads=2&context=4"), "context is 4"),
    (with_(SE, "--model", "python:helpers:lm_with_head", "--transfer-set", "D/seq.zarr"),
     "predicts 7 classes per token"),
    (with_(SE, "--model", "D/nan.pt"), "has NaN or inf"),
    (["report", "D/seq.zarr", "--out", "D/rep"], "expected an example set"),
    (["merge", "D/seqd.zarr", "D/seqd.zarr", "--out", "D/m.zarr"], "is a sequence set"),
    (["merge", "D/set.zarr", "D/seqd.zarr", "--out", "D/m.zarr"], "is a sequence set"),
    (["info", "D/seq.zarr", "--stats"], "sparse sequence set"),
    # run
    (["run", "D/nowhere.toml"], "no pipeline file"),
    (["run", "D/bad.toml"], "is not valid TOML"),
    (["run", "D/p.toml", "--quick", "--out", "D/run", "--set", "nokey"], "--set takes"),
    (["run", "D/p.toml", "--quick", "--out", "D/run", "--set", "=3"], "--set takes"),
    (["run", "D/p.toml", "--quick", "--out", "D/runs/a", "--set", "teacher.epochs=abc"],
     "teacher.epochs must be a whole number >= 1, got 'abc'"),
    (["run", "D/p.toml", "--quick", "--out", "D/runs/b", "--set", "teacher.epochs=-1"],
     "teacher.epochs must be a whole number >= 1, got -1"),
    (["run", "D/p.toml", "--quick", "--out", "D/runs/c", "--set", "data.train=5"],
     "a DATA spec is a string, got 5"),
    (["run", "D/p.toml", "--quick", "--out", "D/runs/d", "--set", "teacher.model=7"],
     "a MODEL spec is a string, got 7"),
]


def test_the_list_is_long_enough() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize("args, message", CASES,
                         ids=[f"{i}-{a[0]}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line(files: dict[str, str], args: list[str], message: str) -> None:
    d = files["D"]
    other = files["DATA"].replace("data.npz", "other.npz")
    args = [a.replace("DATA_OTHER", other).replace("DATA", files["DATA"])
            .replace("D/", d + "/") if a != "D" else d for a in args]
    message = message.replace("D/", d + "/")
    before = sorted(p.name for p in Path(d).iterdir())
    result = CliRunner().invoke(cli, args)
    out, err = result.stdout, result.stderr
    assert result.exit_code not in (0, None), out
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = err.strip().splitlines()
    if args[0] == "run":  # `run` reports its steps on stderr as it goes
        lines = [line for line in lines if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert message.replace("D/", d + "/") in lines[0], err
    assert "Traceback" not in out + err
    assert any(word in lines[0] for word in ADVICE), f"no advice in: {lines[0]}"
    # nothing new presented as made (the subset/merge/convert outputs included)
    assert sorted(p.name for p in Path(d).iterdir()) == before

"""Sequence teachers end to end: a tiny Hugging Face model saved to disk and loaded by `hf:DIR`,
and a precompute killed midway then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import write_tokens

from conftest import ROOT, TESTS
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import read_offsets
from softlabels.sets.verify import verify


def save_tiny_gpt2(path: Path, seed: int = 0, vocab: int = 11) -> str:
    transformers = pytest.importorskip(
        "transformers", reason="hf: specs need the hf extra (transformers, safetensors)")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(path)
    return f"hf:{path}"


def test_hf_causal_lm_end_to_end(tmp_path: Path) -> None:
    model = save_tiny_gpt2(tmp_path / "gpt")
    tokens = write_tokens(tmp_path / "t.jsonl")
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(cli, ["precompute", "--data", tokens, "--teacher", model,
                                      "--out", str(out), "--topk", "4", "--temperatures", "1,2",
                                      "--chunk-rows", "16", "--batch-size", "5",
                                      "--random-teacher"])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    live = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt").eval()
    with open_transfer_set(out) as ts:
        offsets, toks = read_offsets(ts), ts.read("seq/tokens")
        for s in (0, 11, 22):  # each sequence alone, unpadded, gives the stored targets
            a, b = offsets[s], offsets[s + 1]
            with torch.no_grad():
                z = live(input_ids=torch.tensor(toks[None, a:b], dtype=torch.int64)).logits[0]
            classes, weights = ts.sparse_targets(2.0, a, b)
            np.testing.assert_array_equal(classes, np.sort(torch.topk(z, 4).indices.numpy()))
            np.testing.assert_allclose(weights, torch.softmax(z / 2, -1).gather(
                1, torch.from_numpy(classes)).numpy(), rtol=2e-3, atol=1e-6)
        assert ts.meta["teacher"]["members"][0]["spec"] == model
    assert verify(out, data=tokens, teachers=[model]).ok
    other = save_tiny_gpt2(tmp_path / "other", seed=1)
    checks = {c.name: c.ok for c in verify(out, data=tokens, teachers=[other]).checks}
    assert not checks["teacher weights"] and not checks["teacher"]
    result = CliRunner().invoke(cli, ["verify", str(out), "--data", tokens, "--teacher",
                                      f"hf:{tmp_path / 'missing'}"])
    assert result.exit_code == 1 and "config.json" in result.output


def command(data: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "softlabels", "precompute", "--data", data,
            "--teacher", "python:helpers:tiny_lm", "--out", str(out), "--temperatures", "1,3",
            "--chunk-rows", "16", "--batch-size", "8", "--topk", "3", "--random-teacher"]


def done_blocks(out: Path) -> int:
    try:
        with open_store(out, "r") as store:
            return int(store.read(S.BLOCK_DONE).sum())
    except Exception:  # the set may be mid-creation
        return 0


def test_sigkill_then_rerun_gives_identical_sequence_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_tokens(tmp_path / "t.jsonl", n=300)
    out, ref = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    monkeypatch.setenv("SOFTLABELS_TEST_DELAY", "0")
    precompute(data, ["python:helpers:tiny_lm"], ref, temperatures=[1, 3], chunk_rows=16,
               batch_size=8, topk=3, random_teacher=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}",
           "SOFTLABELS_TEST_DELAY": "0.02"}
    proc = subprocess.Popen(command(data, out), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while done_blocks(out) < 16 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    with open_store(out, "r") as store:
        killed_at, blocks = int(store.read(S.BLOCK_DONE).sum()), len(store.read(S.BLOCK_DONE))
    assert 16 <= killed_at < blocks
    rerun = subprocess.run(command(data, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    with open_transfer_set(out) as a, open_transfer_set(ref) as b:
        assert a.meta["dataset"]["fingerprint"] == b.meta["dataset"]["fingerprint"]
        for name in b.row_arrays():
            np.testing.assert_array_equal(a.read(name), b.read(name))
        np.testing.assert_array_equal(read_offsets(a), read_offsets(b))
    assert verify(out, data=data, teachers=["python:helpers:tiny_lm"]).ok

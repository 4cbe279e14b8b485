"""Stage two for sequences: batches from a sequence set, the KD loss over (B, L, V), and a
student trained from stored targets without the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from token_data import TEACHER, VOCAB, write_tokens

from helpers import TinyLM
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError, SoftlabelsError
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import SEQ_TOKENS, read_offsets
from softlabels.sets.verify import verify
from softlabels.sources.token_files import load_tokens
from softlabels.teachers.models import load_checkpoint
from softlabels.train.losses import kd_loss_from_probs, sequence_kd_loss, sparse_kd_loss
from softlabels.train.metrics import evaluate_sequence_model
from softlabels.train.padded import SequenceBatches
from softlabels.train.trainer import train_sequence_model


@pytest.fixture
def topk_set(tmp_path: Path) -> Path:
    spec = write_tokens(tmp_path / "t.jsonl", masks=True) + "?field=input_ids&mask=loss_mask"
    precompute(spec, [TEACHER], tmp_path / "k.zarr", chunk_rows=16, topk=4,
               temperatures=[1, 2], dtype="float32", random_teacher=True)
    return tmp_path / "k.zarr"


def test_batches_hold_whole_sequences_aligned_with_the_set(topk_set: Path) -> None:
    batches = SequenceBatches(topk_set, temperature=2.0, batch_size=5, seed=1)
    with open_transfer_set(topk_set) as ts:
        offsets, tokens = read_offsets(ts), ts.read(SEQ_TOKENS)
        classes, weights = ts.sparse_targets(2.0)
    seen = []
    for seqs in batches.plan():
        batch = batches.batch(seqs)
        assert batch.tokens.shape[0] == len(seqs) and batch.kind == "topk"
        for i, s in enumerate(seqs):
            a, b = offsets[s], offsets[s + 1]
            n = b - a
            np.testing.assert_array_equal(batch.tokens[i, :n], tokens[a:b])
            np.testing.assert_array_equal(batch.classes[i, :n], classes[a:b])
            np.testing.assert_allclose(batch.weights[i, :n], weights[a:b])
            np.testing.assert_array_equal(batch.mask[i, :n], np.arange(n) >= 2)  # data's mask
            assert not batch.mask[i, n:].any() and (batch.labels[i, n:] == -1).all()
        seen += list(seqs)
    assert sorted(seen) == list(range(23))  # every sequence once per epoch
    first = [list(s) for s in batches.plan()]
    batches.set_epoch(1)
    assert [list(s) for s in batches.plan()] != first


def test_loss_is_the_per_position_kd_loss_over_masked_in_positions(topk_set: Path) -> None:
    batch = next(iter(SequenceBatches(topk_set, temperature=2.0, batch_size=6)))
    logits = torch.randn(*batch.tokens.shape, VOCAB, requires_grad=True)
    loss = sequence_kd_loss(logits, batch, temperature=2.0, alpha=0.7)
    m = batch.mask
    # the hard term is the mean over the masked-in positions that have a next token
    known = m & (batch.labels >= 0)
    hard = F.cross_entropy(logits[known], batch.labels[known])
    expected = 0.7 * sparse_kd_loss(logits[m], batch.classes[m], batch.weights[m],
                                    temperature=2.0) + 0.3 * hard
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (logits.grad[~m] == 0).all() and logits.grad[m].abs().sum() > 0
    dense = torch.softmax(torch.randn(*batch.tokens.shape, VOCAB), -1)
    batch.kind, batch.probs = "dense", dense
    torch.testing.assert_close(
        sequence_kd_loss(logits, batch, temperature=2.0, alpha=0.7),
        0.7 * kd_loss_from_probs(logits[m], dense[m], temperature=2.0) + 0.3 * hard)


def test_student_learns_the_teacher_from_stored_targets(tmp_path: Path) -> None:
    spec = write_tokens(tmp_path / "t.jsonl", n=120)
    precompute(spec, [TEACHER], tmp_path / "k.h5", topk=5, temperatures=[1, 2], random_teacher=True)
    data = load_tokens(str(tmp_path / "t.jsonl"), {}, spec)
    teacher = TinyLM(VOCAB)
    held_out = SequenceBatches.from_tokens(data, batch_size=32, shuffle=False)

    def agreement(model: torch.nn.Module) -> float:
        hits = total = 0
        with torch.no_grad():
            for batch in held_out:
                m = batch.mask
                hits += int((model(batch.tokens)[m].argmax(-1)
                             == teacher(batch.tokens)[m].argmax(-1)).sum())
                total += int(m.sum())
        return hits / total

    before = agreement(TinyLM(VOCAB, seed=5))
    result = train_sequence_model(TEACHER + "?seed=5", SequenceBatches(
        tmp_path / "k.h5", temperature=2.0, batch_size=8), epochs=8, lr=0.03, alpha=1.0,
        temperature=2.0, device="cpu", out=tmp_path / "student.pt")
    after = agreement(result.model)
    assert after > max(0.8, before + 0.3), (before, after)
    # the checkpoint names python:helpers:tiny_lm: code, so trusted explicitly (stage-trust)
    model, payload = load_checkpoint(tmp_path / "student.pt", trust_code=True)
    assert payload["meta"]["temperature"] == 2.0
    report = evaluate_sequence_model(model, held_out, device="cpu")
    assert report["positions"] == int(data.offsets[-1] - len(data))  # each but the last token
    assert 1 < report["perplexity"] < VOCAB * 2 and 0 <= report["token_accuracy"] <= 1


def test_damaged_set_and_wrong_temperature_are_refused(topk_set: Path) -> None:
    with pytest.raises(SoftlabelsError, match="stored temperatures"):
        SequenceBatches(topk_set, temperature=3.0)
    with open_store(topk_set, "r+") as store:
        store.write(SEQ_TOKENS, slice(20, 21), np.array([99], np.int32))
    with pytest.raises(IntegrityError, match="block 1 "):
        SequenceBatches(topk_set, temperature=2.0)


def test_wrong_files_are_refused(tmp_path: Path, topk_set: Path, npz_data: str) -> None:
    precompute(npz_data, ["mlp:16-3"], tmp_path / "examples.zarr", random_teacher=True)
    with pytest.raises(SoftlabelsError, match="not a sequence set"):
        SequenceBatches(tmp_path / "examples.zarr")
    checks = {c.name: c for c in verify(topk_set, data=npz_data).checks}
    assert not checks["data"].ok and "token sequences" in checks["data"].detail
    tokens = load_tokens(str(tmp_path / "t.jsonl"), {}, "tokens:t.jsonl")
    with pytest.raises(SoftlabelsError, match="sequence teacher maps"):
        precompute(tokens, ["mlp:16-3"], tmp_path / "x.zarr",
                   random_teacher=True)  # an example model
    assert not (tmp_path / "x.zarr").exists()

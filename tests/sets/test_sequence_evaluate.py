"""`softlabels evaluate` on a sequence (language-model) student: per-token cross-entropy,
perplexity and next-token accuracy on token data, and, with a sequence set of that data, the
closeness to the teacher's stored targets at T (dense: agreement and KL; top-k: agreement and
the KL over k + 1 buckets; sampled: the cross-entropy to the stored draws). Every value is
checked against a computation by hand: each sequence run alone through the models, unpadded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from token_data import VOCAB, write_tokens

from helpers import TinyLM
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.operations import subset
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import SEQ_MASK, read_offsets
from softlabels.sets.evaluate import evaluate
from softlabels.sources.token_files import load_tokens
from softlabels.teachers.models import build_model, load_model, save_checkpoint

TEACHER = "python:helpers:tiny_lm"
STUDENT = "gpt:11?dim=8&layers=1&heads=2&context=16"


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Masked token data (23 sequences, 195 positions: not a multiple of the 16-row chunks),
    a student checkpoint, and the sequences and masks as lists for the computations by hand."""
    d = tmp_path_factory.mktemp("seqeval")
    path = d / "t.jsonl"
    spec = write_tokens(path, masks=True) + "?mask=loss_mask"
    torch.manual_seed(1)
    save_checkpoint(build_model(STUDENT), d / "s.pt", spec=STUDENT)
    data = load_tokens(str(path), {"mask": "loss_mask"}, spec)
    seqs = [data.tokens[a:b].tolist() for a, b in zip(data.offsets[:-1], data.offsets[1:])]
    masks = [data.mask[a:b].astype(bool) for a, b in zip(data.offsets[:-1], data.offsets[1:])]
    return {"d": d, "data": spec, "model": str(d / "s.pt"), "seqs": seqs, "masks": masks}


def run_json(*args: object) -> dict:
    result = CliRunner().invoke(cli, ["evaluate", *[str(a) for a in args], "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(L, C) logits of one sequence run alone."""
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0].float()


def student(lm: dict) -> torch.nn.Module:
    return load_model(lm["model"])[0]


def test_perplexity_and_accuracy_equal_cross_entropy_by_hand(lm: dict) -> None:
    """Masked-in positions with a next token, each sequence alone, torch's cross_entropy."""
    net = student(lm)
    z_all, y_all = [], []
    for ids, mask in zip(lm["seqs"], lm["masks"]):
        keep = mask[:-1]  # the last position has no next token
        z_all.append(logits_of(net, ids)[:-1][torch.from_numpy(keep)])
        y_all.append(torch.tensor(ids[1:], dtype=torch.long)[torch.from_numpy(keep)])
    z, y = torch.cat(z_all), torch.cat(y_all)
    ce = float(F.cross_entropy(z, y))
    report = run_json("--data", lm["data"], "--model", lm["model"])
    assert report["positions"] == len(y) and report["sequences"] == 23
    assert report["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    assert report["perplexity"] == pytest.approx(np.exp(ce), rel=1e-5)
    assert report["token_accuracy"] == pytest.approx(float((z.argmax(-1) == y).float().mean()))
    assert 0 < report["token_accuracy"] < 1 and "teacher_targets" not in report
    # the text output says the same, in words a user reads
    text = CliRunner().invoke(cli, ["evaluate", "--data", lm["data"], "--model", lm["model"]])
    assert text.exit_code == 0, text.output
    assert f"perplexity {np.exp(ce):.4f}" in text.output
    assert f"over {len(y)} positions of 23 sequences" in text.output


def teacher_and_student(lm: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's and the student's logits at every position (flat), and the set's mask."""
    net, teacher = student(lm), TinyLM(VOCAB)
    t = torch.cat([logits_of(teacher, ids) for ids in lm["seqs"]])
    s = torch.cat([logits_of(net, ids) for ids in lm["seqs"]])
    return t, s, torch.from_numpy(np.concatenate(lm["masks"]))


def test_dense_set_agreement_and_kl_at_t_by_hand(lm: dict, suffix: str) -> None:
    out = lm["d"] / f"dense{suffix}"
    if not out.exists():
        precompute(lm["data"], [TEACHER], out, chunk_rows=16, temperatures=[1, 2],
                   dtype="float32", random_teacher=True)
    t, s, m = teacher_and_student(lm)
    t, s = t[m], s[m]
    for temperature in (1.0, 2.0, 3.0):  # 3: re-tempered from the stored logits
        p = torch.softmax(t / temperature, -1)
        kl = float((p * (p.log() - torch.log_softmax(s / temperature, -1))).sum(-1).mean())
        report = run_json("--data", lm["data"], "--model", lm["model"], "--transfer-set", out,
                          "--temperature", temperature)
        assert report["teacher_targets"] == "dense"
        assert report["teacher_temperature"] == temperature
        assert report["teacher_positions"] == int(m.sum()) < len(m)  # the mask's positions
        assert report["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
        assert report["teacher_agreement"] == pytest.approx(
            float((s.argmax(-1) == t.argmax(-1)).float().mean()))
    # the default T is 1 (as for example sets)
    assert run_json("--data", lm["data"], "--model", lm["model"], "--transfer-set",
                    out)["teacher_temperature"] == 1.0


def test_topk_set_kl_over_k_plus_one_buckets_by_hand(lm: dict) -> None:
    """Top-k: agreement is exact; the KL groups the classes outside the teacher's top k into
    one bucket, so it lies below the dense KL."""
    out = lm["d"] / "topk.zarr"
    precompute(lm["data"], [TEACHER], out, chunk_rows=16, topk=3, temperatures=[2, 4],
               dtype="float32", random_teacher=True)
    t, s, m = teacher_and_student(lm)
    t, s = t[m], s[m]
    p, log_q = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    top = t.topk(3, -1).indices
    pk, qk = p.gather(1, top), log_q.exp().gather(1, top)
    rest_p, rest_q = 1 - pk.sum(-1), 1 - qk.sum(-1)
    kl = float(((pk * (pk / qk).log()).sum(-1) + rest_p * (rest_p / rest_q).log()).mean())
    dense_kl = float((p * (p.log() - log_q)).sum(-1).mean())
    report = run_json("--data", lm["data"], "--model", lm["model"], "--transfer-set", out)
    assert report["teacher_targets"] == "topk" and report["teacher_temperature"] == 2.0
    assert "kl_to_teacher" not in report  # not the full KL: a differently named measure
    assert report["kl_to_teacher_topk"] == pytest.approx(kl, rel=1e-4)
    assert report["kl_to_teacher_topk"] < dense_kl
    assert report["teacher_agreement"] == pytest.approx(
        float((s.argmax(-1) == t.argmax(-1)).float().mean()))
    text = CliRunner().invoke(cli, ["evaluate", "--data", lm["data"], "--model", lm["model"],
                                    "--transfer-set", str(out), "--temperature", "4"])
    assert text.exit_code == 0, text.output
    assert "a lower bound on the full KL" in text.output and "at T = 4" in text.output


def test_sampled_set_reports_the_cross_entropy_to_the_stored_draws(lm: dict) -> None:
    """Sampled: no agreement or KL; the mean -log q_T of the stored draws, which estimates
    H(p_T, q_T) without bias (checked loosely against the exact value with 64 draws)."""
    out = lm["d"] / "sample.zarr"
    precompute(lm["data"], [TEACHER], out, chunk_rows=16, sample_k=64, temperatures=[2],
               dtype="float32", random_teacher=True)
    t, s, m = teacher_and_student(lm)
    log_q = torch.log_softmax(s / 2, -1)
    with open_transfer_set(out) as ts:
        draws = torch.from_numpy(ts.read(S.SAMPLE_INDICES)[0].astype(np.int64))
    by_hand = float(-log_q[m].gather(1, draws[m]).mean())
    exact = float(-(torch.softmax(t / 2, -1) * log_q)[m].sum(-1).mean())
    report = run_json("--data", lm["data"], "--model", lm["model"], "--transfer-set", out)
    assert report["teacher_targets"] == "sample"
    assert report["teacher_cross_entropy"] == pytest.approx(by_hand, rel=1e-5)
    assert report["teacher_cross_entropy"] == pytest.approx(exact, rel=0.05)
    assert "teacher_agreement" not in report and "kl_to_teacher" not in report
    text = CliRunner().invoke(cli, ["evaluate", "--data", lm["data"], "--model", lm["model"],
                                    "--transfer-set", str(out)])
    assert "cross-entropy to the teacher's samples" in text.output


def test_a_subset_by_sequence_is_compared_on_its_own_positions(lm: dict) -> None:
    """A set cut by whole sequences: the teacher measures cover its positions only, and the
    data measures still cover every sequence of the data."""
    full, part = lm["d"] / "full.zarr", lm["d"] / "part.zarr"
    precompute(lm["data"], [TEACHER], full, chunk_rows=16, dtype="float32", random_teacher=True)
    subset(full, part, fraction=0.4, seed=3)
    with open_transfer_set(part) as ts:
        offsets, index = read_offsets(ts), ts.index()
        kept = index[offsets[:-1]]
        positions = int(ts.read(SEQ_MASK).astype(bool).sum())
    assert 0 < len(kept) < 23
    t, s, _ = teacher_and_student(lm)
    starts = np.concatenate([[0], np.cumsum([len(x) for x in lm["seqs"]])])
    rows = np.concatenate([np.arange(starts[k], starts[k + 1])[lm["masks"][k]] for k in kept])
    p = torch.softmax(t[rows], -1)
    kl = float((p * (p.log() - torch.log_softmax(s[rows], -1))).sum(-1).mean())
    report = evaluate(lm["data"], lm["model"], transfer_set=part)
    assert report["teacher_positions"] == positions == len(rows)
    assert report["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert report["sequences"] == 23


def test_other_token_data_is_refused_against_the_set(lm: dict, tmp_path: Path) -> None:
    out = lm["d"] / "full.zarr"
    if not out.exists():
        precompute(lm["data"], [TEACHER], out, chunk_rows=16, random_teacher=True)
    other = write_tokens(tmp_path / "o.jsonl", seed=9, masks=True) + "?mask=loss_mask"
    result = CliRunner().invoke(cli, ["evaluate", "--data", other, "--model", lm["model"],
                                      "--transfer-set", str(out)])
    assert result.exit_code == 1 and "does not match the dataset" in result.stderr


def test_streamed_and_in_memory_targets_give_the_same_report(
        lm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A set whose targets do not fit is read a window of checked blocks at a time."""
    from softlabels.sets import evaluate as evaluation

    out = lm["d"] / "topk.zarr"
    if not out.exists():
        precompute(lm["data"], [TEACHER], out, chunk_rows=16, topk=3, temperatures=[2, 4],
                   random_teacher=True)
    loaded = evaluate(lm["data"], lm["model"], transfer_set=out, temperature=4)
    monkeypatch.setattr(evaluation, "MAX_IN_MEMORY", 0)

    made = []

    class Spy(evaluation.StreamingSequenceBatches):
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(evaluation, "StreamingSequenceBatches", Spy)
    streamed = evaluate(lm["data"], lm["model"], transfer_set=out, temperature=4)
    assert len(made) == 1  # streamed
    assert streamed.keys() == loaded.keys() and streamed["teacher_targets"] == "topk"
    for key in ("kl_to_teacher_topk", "teacher_agreement", "teacher_positions", "perplexity"):
        assert streamed[key] == pytest.approx(loaded[key], rel=1e-6)


def test_a_damaged_block_of_targets_is_one_line_naming_it(lm: dict, tmp_path: Path) -> None:
    """The teacher's targets are read only through checked blocks: flipped stored logits are
    refused, naming their block, not turned into a silently wrong KL."""
    from softlabels.format.backends import open_store

    out = tmp_path / "k.zarr"
    precompute(lm["data"], [TEACHER], out, chunk_rows=16, topk=3, temperatures=[1],
               random_teacher=True)
    with open_store(out, "r+") as store:
        z = store.read(S.TOPK_LOGITS, slice(40, 41))
        store.write(S.TOPK_LOGITS, slice(40, 41), z[:, ::-1].copy())
    result = CliRunner().invoke(cli, ["evaluate", "--data", lm["data"], "--model", lm["model"],
                                      "--transfer-set", str(out)])
    assert result.exit_code == 1, result.output
    assert "block 2 (rows 32-47)" in result.stderr and "checksum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout


def test_data_whose_mask_keeps_nothing_is_refused(lm: dict, tmp_path: Path) -> None:
    path = tmp_path / "none.jsonl"
    path.write_text('{"input_ids": [1, 2, 3], "m": [0, 0, 0]}\n')
    result = CliRunner().invoke(cli, ["evaluate", "--data", f"tokens:{path}?mask=m",
                                      "--model", lm["model"]])
    assert result.exit_code == 1
    assert "no position with a next token" in result.stderr


def test_a_hopeless_student_has_infinite_perplexity_not_a_crash(lm: dict, tmp_path: Path) -> None:
    """Cross-entropy past exp's range (huge, confidently wrong logits) is reported, with an
    infinite perplexity, instead of an OverflowError."""
    net = build_model(STUDENT)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([1e4] + [0.0] * (VOCAB - 1)))  # always token 0
    save_checkpoint(net, tmp_path / "h.pt", spec=STUDENT)
    report = evaluate(lm["data"], str(tmp_path / "h.pt"))
    assert report["cross_entropy"] > 709 and report["perplexity"] == float("inf")
    # --json stays strict JSON (no Infinity token): the infinite perplexity is null
    result = CliRunner().invoke(cli, ["evaluate", "--data", lm["data"], "--model",
                                      str(tmp_path / "h.pt"), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert printed["perplexity"] is None and printed["cross_entropy"] > 709


def test_batches_fit_a_logits_budget_and_do_not_change_the_report(
        lm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default as many sequences share a batch as keep the (B, L, C) logits within
    LOGITS_BUDGET (a 128k vocabulary must not take (64, L, 128k) at once); padding and batch
    size leave every figure as it was."""
    from softlabels.sets import evaluate as evaluation
    from softlabels.train.padded import SequenceBatches

    out = lm["d"] / "full.zarr"
    if not out.exists():
        precompute(lm["data"], [TEACHER], out, chunk_rows=16, random_teacher=True)
    sizes = []

    class Spy(SequenceBatches):
        @classmethod
        def from_tokens(cls, data: object, **kwargs: object) -> SequenceBatches:
            sizes.append(kwargs["batch_size"])
            return SequenceBatches.from_tokens(data, **kwargs)

    monkeypatch.setattr(evaluation, "SequenceBatches", Spy)
    wide = evaluate(lm["data"], lm["model"], transfer_set=out)
    longest = max(len(x) for x in lm["seqs"])
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET", 4 * VOCAB * longest * 3)
    narrow = evaluate(lm["data"], lm["model"], transfer_set=out)
    assert sizes == [64, 3]
    for key in ("cross_entropy", "token_accuracy", "kl_to_teacher", "teacher_agreement"):
        assert narrow[key] == pytest.approx(wide[key], rel=1e-5)


@pytest.mark.parametrize("token", [5, 10_000], ids=["another token", "past the vocabulary"])
def test_set_tokens_that_are_not_the_datas_are_refused_in_one_line(lm: dict, tmp_path: Path,
                                                                    token: int) -> None:
    """The student's inputs are the set's stored tokens. Edited with forged checksums (the
    sample hashes left as they were, so they still match the data), they must not be trained
    or scored on: one line naming the block, not silence, and not an embedding's IndexError."""
    from checksums import forge_checksums

    from softlabels.format.backends import open_store
    from softlabels.format.sequence import SEQ_TOKENS

    out = tmp_path / "set.zarr"
    precompute(lm["data"], [TEACHER], out, chunk_rows=16, dtype="float32", random_teacher=True)
    with open_store(out, "r+") as store:
        tokens = store.read(SEQ_TOKENS)
        tokens[40] = token if tokens[40] != token else token + 1  # block 2
        store.write(SEQ_TOKENS, slice(None), tokens)
    forge_checksums(out, 2)
    with open_transfer_set(out) as ts:  # the block still reads back as checked
        ts.read_block(2)
    runs = {"evaluate": ["evaluate", "--data", lm["data"], "--model", lm["model"],
                         "--transfer-set", str(out)],
            "train": ["train", "--data", lm["data"], "--model", STUDENT, "--transfer-set",
                      str(out), "--out", str(tmp_path / "s.pt"), "--epochs", "1"]}
    for name, args in runs.items():
        for extra in ([], ["--stream"]) if name == "train" else ([],):
            result = CliRunner().invoke(cli, [*args, *extra])
            lines = result.stderr.strip().splitlines()
            assert result.exit_code != 0 and len(lines) == 1, (name, result.stderr)
            assert "block 2 " in lines[0] and "not its data's" in lines[0], lines[0]
            assert "Traceback" not in result.output
    assert not (tmp_path / "s.pt").exists()

"""The hybrid sparse target (format/targets/hybrid.py): a nucleus head plus an importance-sampled
tail, optionally 8-bit; written, read, checked and trained on through the one codec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import OptionError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.format.targets import Hybrid, TeacherOutputs
from softlabels.options import PrecomputeOptions
from softlabels.sets.evaluate import evaluate
from softlabels.sets.export import export_set
from softlabels.sets.verify import verify
from softlabels.sources.tokens import TokenSequences
from softlabels.train.losses import kd_loss_from_probs, sequence_kd_loss, sparse_kd_loss
from softlabels.train.padded import SequenceBatches, StreamingSequenceBatches
from softlabels.train.trainer import train_student

TEMPS = (1.0, 2.5)


def logits(n: int = 64, c: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * torch.linspace(0.5, 4, n)[:, None]


def encode(h: Hybrid, z: torch.Tensor, seed: int = 1) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    out = h.encode(TeacherOutputs(z, lambda: None, lambda j: None), TEMPS,
                   lambda leading, m: torch.rand(*leading, len(z), m, generator=g))
    out = {name: a.numpy() for name, a in out.items()}
    if not h.quantize:  # as a float32 set stores them
        out[S.HYBRID_VALUES] = out[S.HYBRID_VALUES].astype(np.float32)
    return out


def test_head_is_the_smallest_nucleus_capped_and_padded() -> None:
    z = logits()
    h = Hybrid(k=12, nucleus=0.8, tail=5)
    a = encode(h, z)
    p0 = torch.softmax(z.double(), -1).numpy()
    for r in range(len(z)):
        order = np.argsort(-p0[r])
        need = min(int(np.searchsorted(np.cumsum(p0[r][order]), 0.8)) + 1, 12)
        head = a[S.HYBRID_INDICES][r, :12]
        assert list(head[:need]) == sorted(order[:need]) and (head[need:] == -1).all()
        tail = a[S.HYBRID_INDICES][r, 12:]
        assert (np.diff(tail) >= 0).all() and not np.isin(tail, head[:need]).any()
        used = a[S.HYBRID_INDICES][r] >= 0
        np.testing.assert_allclose(a[S.HYBRID_VALUES][r][used],
                                   (z[r] - z[r].max()).numpy()[a[S.HYBRID_INDICES][r][used]])
    for k, t in enumerate(TEMPS):
        want = torch.logsumexp(z / t, -1) - z.max(-1).values / t
        np.testing.assert_allclose(a[S.HYBRID_LOGSUMEXP][:, k], want.numpy(), rtol=1e-6)
    assert Hybrid.problems(h, a, 40, TEMPS, "float32") is None


@pytest.mark.parametrize("t", TEMPS)
def test_weights_and_gradient_are_unbiased_at_every_stored_temperature(t: float) -> None:
    """Averaged over many independent tails, the weights reach p_T and the loss's gradient
    the dense one (the tail is drawn at T_0 = 1 and reweighted at T = 2.5)."""
    z = logits(n=1, c=30, seed=3).repeat(40000, 1)
    h = Hybrid(k=6, nucleus=0.6, tail=4)
    a = encode(h, z, seed=5)
    classes, w, log_p = h.decode(a, t, TEMPS.index(t), TEMPS)
    p = torch.softmax(z[0].double() / t, -1)
    dense = torch.zeros(len(z), 30, dtype=torch.float64).scatter_add_(1, classes, w.double())
    head = classes[0, :6][classes[0, :6] >= 0]
    torch.testing.assert_close(dense[0, head], p[head], rtol=1e-5, atol=1e-7)  # head: exact
    np.testing.assert_allclose(dense.mean(0).numpy(), p.numpy(), atol=4e-3)
    s = torch.randn(1, 30, generator=torch.Generator().manual_seed(9)).repeat(len(z), 1)
    s.requires_grad_(True)
    sparse_kd_loss(s, classes, w, log_p, temperature=t, convention="estimate").backward()
    estimate = s.grad.clone()
    s.grad = None
    kd_loss_from_probs(s, p.float().expand(len(z), 30), temperature=t).backward()
    gap = (estimate.mean(0) * len(z) - s.grad[0] * len(z)).norm() / (s.grad[0] * len(z)).norm()
    assert gap < 0.03
    # and the log-probabilities are the exact ones of the stored classes
    used = w[0] > 0
    torch.testing.assert_close(log_p[0][used].double(), p.log()[classes[0][used]], atol=1e-5,
                               rtol=0)


def test_quantised_values_dequantise_within_half_a_step() -> None:
    z = logits()
    h = Hybrid(k=10, nucleus=0.9, tail=6, quantize=8)
    a = encode(h, z)
    assert a[S.HYBRID_VALUES].dtype == np.uint8 and a[S.HYBRID_SCALE].shape == (len(z),)
    step = a[S.HYBRID_SCALE][:, None]
    idx = a[S.HYBRID_INDICES]
    exact = np.take_along_axis((z - z.max(-1, keepdims=True).values).numpy(), idx.clip(0), 1)
    got = -a[S.HYBRID_VALUES].astype(np.float32) * step  # FORMAT.md's dequantisation
    np.testing.assert_allclose(h.shifted_logits(a), got)
    assert (np.abs(got - exact)[idx >= 0] <= (step / 2 * 1.0001 + 1e-6).repeat(16, 1)[idx >= 0]
            ).all()
    assert a[S.HYBRID_VALUES].max() == 255  # the row's smallest stored value is the last code
    assert h.problems(a, 40, TEMPS, "float32") is None


def test_a_row_with_no_residual_mass_draws_no_tail() -> None:
    z = torch.full((2, 8), -200.0)
    z[:, 3] = 0
    a = encode(Hybrid(k=2, nucleus=0.5, tail=3), z)
    assert (a[S.HYBRID_INDICES][:, 2:] == -1).all() and (a[S.HYBRID_INDICES][:, 0] == 3).all()
    classes, w, _ = (x.numpy() for x in Hybrid(k=2, nucleus=0.5, tail=3).decode(a, 1.0, 0, TEMPS))
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("edit, problem", [
    (lambda a: a[S.HYBRID_INDICES].__setitem__((0, slice(0, 2)), a[S.HYBRID_INDICES][0, 1::-1]),
     "not ascending"),
    (lambda a: a[S.HYBRID_INDICES].__setitem__((1, slice(6, 9)), a[S.HYBRID_INDICES][1, 0]),
     "inside the head"),
    (lambda a: a[S.HYBRID_LOGSUMEXP].__setitem__((2, 1), -0.5), "negative log-sum-exp"),
    (lambda a: a[S.HYBRID_VALUES].__setitem__((3, slice(0, 6)), -1.0), "largest logit"),
    (lambda a: a[S.HYBRID_INDICES].__setitem__((4, 0), 40), "outside"),
])
def test_problems_name_a_broken_recipe(edit, problem: str) -> None:
    h = Hybrid(k=6, nucleus=0.7, tail=3)
    a = encode(h, logits(n=8))
    edit(a)
    assert problem in h.problems(a, 40, TEMPS, "float32")


def test_a_loose_or_short_head_is_named() -> None:
    h = Hybrid(k=8, nucleus=0.5, tail=2)
    a = encode(h, logits(n=32, c=40, seed=4))
    wider = Hybrid(k=8, nucleus=0.9, tail=2)  # the same arrays read with a larger nucleus
    assert "below the nucleus" in wider.problems(a, 40, TEMPS, "float32")
    b = encode(wider, logits(n=32, c=40, seed=4))
    assert "larger than needed" in h.problems(b, 40, TEMPS, "float32")


def test_options_refuse_incomplete_hybrids() -> None:
    with pytest.raises(OptionError, match="--nucleus"):
        PrecomputeOptions(topk=4, tail=2)
    with pytest.raises(OptionError, match="--topk K"):
        PrecomputeOptions(nucleus=0.9, tail=2)
    with pytest.raises(OptionError, match="quantize"):
        PrecomputeOptions(topk=4, nucleus=0.9, quantize=4)
    assert PrecomputeOptions(topk=4, nucleus=0.9, tail=2).sparse_args()["hybrid"] == \
        Hybrid(k=4, nucleus=0.9, tail=2)


@pytest.mark.parametrize("quantize", [0, 8])
def test_example_set_round_trip_verify_and_training(tmp_path: Path, npz_data: str,
                                                    suffix: str, quantize: int) -> None:
    out = tmp_path / f"h.{suffix}"
    precompute(npz_data, ["mlp:16-6"], out, temperatures=[1, 3], chunk_rows=CHUNK, topk=3,
               nucleus=0.7, tail=2, quantize=quantize, random_teacher=True)
    with open_transfer_set(out) as ts:
        assert ts.target.to_meta() == {"kind": "hybrid", "k": 3, "nucleus": 0.7, "tail": 2,
                             "quantize": quantize or None}
        classes, w, log_p = ts.sparse_targets(3.0)
        assert classes.shape == w.shape == log_p.shape == (ts.num_rows, 5)
    report = verify(out, data=npz_data, teachers=["mlp:16-6"], device="cpu")
    assert report.ok, report
    assert {c.name for c in report.checks} >= {"hybrid", "teacher"}
    r = train_student(npz_data, "mlp:16-6", transfer_set=out, temperature=3.0, epochs=1,
                      device="cpu")
    assert np.isfinite(r.history[-1]["loss"])
    scores = evaluate(npz_data, r.model, transfer_set=out, device="cpu")
    assert 0 <= scores["teacher_agreement"] <= 1


def test_sequence_set_batches_stream_and_evaluate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Embedding(30, 6), nn.Linear(6, 30))
    rng = np.random.default_rng(0)
    data = TokenSequences([rng.integers(0, 30, n).tolist() for n in (9, 4, 17, 6, 11)])
    out = tmp_path / "h.h5"
    precompute(data, [teacher], out, temperatures=[1, 2], topk=5, nucleus=0.9,
               tail=3, chunk_rows=CHUNK)
    assert verify(out, data=data, teachers=[teacher], device="cpu").ok
    whole = SequenceBatches(out, temperature=2.0, batch_size=2, shuffle=False)
    streamed = StreamingSequenceBatches(out, temperature=2.0, batch_size=2, shuffle=False,
                                        window_blocks=1)
    def per_sequence(batches) -> dict[int, list[torch.Tensor]]:
        return {int(q): [b.classes[i], b.weights[i], b.log_p[i]]
                for b in batches for i, q in enumerate(b.sequences)
                for _ in [None] if b.kind == "hybrid"}

    mine, theirs = per_sequence(whole), per_sequence(streamed)
    assert sorted(mine) == sorted(theirs) == list(range(5))
    for q, cols in mine.items():
        n = len(data[q])
        for a, b in zip(cols, theirs[q]):
            assert torch.equal(a[:n], b[:n])
    for b in whole:
        z = torch.randn(*b.tokens.shape, 30, requires_grad=True)
        sequence_kd_loss(z, b, temperature=2.0).backward()
        assert torch.isfinite(z.grad).all() and z.grad[b.mask].abs().sum() > 0
    streamed.close()
    with pytest.raises(OptionError, match="hybrid set"):
        export_set(out, tmp_path / "export")
    student = nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 30))
    scores = evaluate(data, student, transfer_set=out, temperature=2.0, device="cpu")
    assert scores["teacher_targets"] == "hybrid" and scores["kl_to_teacher"] > 0

"""Streamed sequence sets (`StreamingSequenceBatches`): whole checked blocks a window at a time,
sequences kept whole across block boundaries; an epoch serves the very rows the in-memory
batches serve, and damage is refused naming its block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from token_data import TEACHER, write_tokens

from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format.backends import open_store
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.sequence import SEQ_TOKENS, read_offsets
from softlabels.train.padded import SequenceBatches, StreamingSequenceBatches

KINDS = {"topk": dict(topk=4, dtype="float16"), "sample": dict(sample_k=3),
         "dense": dict(dtype="float32")}


@pytest.fixture(params=sorted(KINDS))
def seq_set(request: pytest.FixtureRequest, tmp_path: Path, out_path: Path) -> Path:
    """61 sequences (492 positions: not a multiple of the 16-row chunk), on both backends."""
    spec = write_tokens(tmp_path / "t.jsonl", n=61, masks=True) + \
        "?field=input_ids&mask=loss_mask"
    out = out_path
    precompute(spec, [TEACHER], out, chunk_rows=16, temperatures=[1, 2],
               **KINDS[request.param], random_teacher=True)
    return out


def per_sequence(batches: object, epoch: int) -> dict[int, dict[str, np.ndarray]]:
    """Each served sequence's unpadded (tokens, labels, mask, targets), by sequence number."""
    batches.set_epoch(epoch)
    seen: dict[int, dict[str, np.ndarray]] = {}
    for batch in batches:
        assert batch.tokens.shape[1] == int(batches.lengths[batch.sequences].max())
        for i, s in enumerate(batch.sequences.tolist()):
            assert s not in seen, f"sequence {s} served twice in one epoch"
            n = int(batches.lengths[s])
            assert (batch.labels[i, n:] == -1).all() and not batch.mask[i, n:].any()
            seen[s] = {name: getattr(batch, name)[i, :n].numpy()
                       for name in ("tokens", "labels", "mask", "classes", "weights", "probs")
                       if getattr(batch, name) is not None}
    return seen


@pytest.mark.parametrize("window", [1, 3])
def test_a_streamed_epoch_serves_the_in_memory_rows(seq_set: Path, window: int) -> None:
    chosen = np.arange(0, 61, 2)  # a selection, as `train --fraction` makes
    memory = SequenceBatches(seq_set, temperature=2.0, batch_size=4, sequences=chosen, seed=3)
    stream = StreamingSequenceBatches(seq_set, temperature=2.0, batch_size=4, seed=3,
                                      sequences=chosen, window_blocks=window)
    with open_transfer_set(seq_set) as ts:
        offsets = read_offsets(ts)
        crossing = ((offsets[:-1] // ts.block_rows) != ((offsets[1:] - 1) // ts.block_rows))
        assert crossing[chosen].sum() >= 3  # sequences that run into the next block
    assert stream.num_positions == memory.num_positions
    for epoch in (0, 1):
        want, got = per_sequence(memory, epoch), per_sequence(stream, epoch)
        assert sorted(got) == sorted(want) == chosen.tolist()
        for s in want:
            assert want[s].keys() == got[s].keys()
            for name in want[s]:
                np.testing.assert_array_equal(got[s][name], want[s][name],
                                              err_msg=f"sequence {s} {name}")
    stream.close()


def test_order_is_seeded_and_reads_are_bounded_by_the_window(
        seq_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        s = StreamingSequenceBatches(seq_set, batch_size=3, seed=seed, window_blocks=2)
        s.set_epoch(epoch)
        out = [b.sequences.tolist() for b in s]
        s.close()
        return out

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    reads: list[int] = []
    real = TransferSet.read_block
    monkeypatch.setattr(TransferSet, "read_block",
                        lambda self, b, *args, **kw: reads.append(b) or real(self, b, *args, **kw))
    stream = StreamingSequenceBatches(seq_set, batch_size=3, window_blocks=2)
    per_window = []
    for _, batches in stream.plan():
        before = len(reads)
        n = sum(len(b) for b in batches)
        assert n == len(list(_served(stream, batches, reads)))
        per_window.append(len(reads) - before)
    # a window holds its 2 consecutive blocks and the one its last sequence may continue into
    # (sequences are shorter than a block here), never the set
    assert max(per_window) <= 3 < stream.ts.num_blocks
    stream.close()


def _served(stream: StreamingSequenceBatches, batches: list[np.ndarray],
            reads: list[int]) -> list[int]:
    """Serve one window alone (a stream over just these batches)."""
    plan = stream.plan
    stream.plan = lambda: [(None, batches)]  # type: ignore[method-assign]
    try:
        return [s for b in stream for s in b.sequences.tolist()]
    finally:
        stream.plan = plan  # type: ignore[method-assign]


def test_damage_in_a_block_is_refused_naming_it(seq_set: Path) -> None:
    with open_store(seq_set, "r+") as store:
        store.write(SEQ_TOKENS, slice(20, 21), np.array([99], np.int32))  # in block 1
    stream = StreamingSequenceBatches(seq_set, batch_size=4, window_blocks=2)
    with pytest.raises(IntegrityError, match="block 1 "):
        for _ in stream:
            pass
    stream.close()

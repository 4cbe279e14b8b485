"""`softlabels info --stats`: the statistics of whole checked blocks, read one block at a time;
a damaged block is refused naming it, never averaged into the figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checksums import block_chunk, flip_byte, forge_checksums
from click.testing import CliRunner

from conftest import CHUNK
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set
from softlabels.format.statistics import set_statistics


@pytest.fixture
def made(npz_data: str, out_path: Path) -> Path:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return out_path


def test_stats_are_the_means_over_every_row(made: Path) -> None:
    with open_transfer_set(made) as ts:
        st = set_statistics(ts)
        probs, logits, labels = (ts.read(S.PROBS).astype(np.float64), ts.read(S.LOGITS),
                                 ts.read(S.LABELS))
    for k, t in enumerate([1, 4]):
        np.testing.assert_allclose(st["class_mass"][str(t)], probs[k].mean(0), atol=1e-6)
        entropy = -(probs[k] * np.log(probs[k])).sum(1).mean()
        assert st["mean_entropy"][str(t)] == pytest.approx(entropy, abs=1e-5)
    assert st["labelled_rows"] == 103
    assert st["teacher_accuracy"] == pytest.approx((logits.argmax(1) == labels).mean())


def test_stats_read_one_block_at_a_time(made: Path) -> None:
    """Bounded memory: every read of a row array spans one block's rows at most."""
    spans: list[int] = []
    with open_transfer_set(made) as ts:
        read, read_many = ts.store.read, ts.store.read_many

        def one(name: str, selection: object = slice(None)) -> np.ndarray:
            got = read(name, selection)
            if name in ts.row_arrays():
                spans.append(got.shape[S.row_axis(name)])
            return got

        def many(requests: list) -> list[np.ndarray]:
            got = read_many(requests)
            spans.extend(a.shape[S.row_axis(n)] for (n, _), a in zip(requests, got)
                         if n in ts.row_arrays())
            return got

        ts.store.read, ts.store.read_many = one, many
        set_statistics(ts)
    assert spans and max(spans) == CHUNK


def _nan_in_probs(path: Path, block: int) -> None:
    with open_store(path, "r+") as store:
        store.write(S.PROBS, (1, slice(block * CHUNK + 3, block * CHUNK + 4), slice(0, 1)),
                    np.full((1, 1), np.nan, np.float32))
    forge_checksums(path, block)  # the checksum matches: the value check must refuse it


@pytest.mark.parametrize("damage", ["nan", "flipped byte"])
def test_a_damaged_block_is_refused_naming_it(made: Path, damage: str) -> None:
    if damage == "nan":
        _nan_in_probs(made, 2)
    else:
        flip_byte(made, S.PROBS, block_chunk(S.PROBS, (2, 103, 3), 2, lead=1))
    with open_transfer_set(made) as ts, pytest.raises(IntegrityError,
                                                       match=r"block 2 \(rows 32-47\)"):
        set_statistics(ts)
    result = CliRunner().invoke(cli, ["info", str(made), "--stats"])
    text = result.stdout + result.stderr
    assert result.exit_code == 1 and text.count("\n") == 1, text
    assert "block 2 (rows 32-47)" in text and "Traceback" not in text

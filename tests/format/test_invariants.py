"""Invariants checked, not just checksums: a set whose checksums were recomputed over
impossible targets (as FORMAT.md says, as a buggy writer in another language would) is refused
by verify and by every checked read; a version downgrade cannot switch the checksums off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checksums import as_version_1, forge_checksums
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.blockcheck import PROBS_SUM_TOLERANCE, target_problem
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify

ROW = 20  # in block 1 (chunks of 16 rows)


@pytest.fixture
def data(tmp_path: Path) -> str:
    return make_npz(tmp_path / "d.npz", n=45)


def _made(tmp_path: Path, data: str, **kwargs: object) -> Path:
    path = tmp_path / "set.zarr"
    precompute(data, ["mlp:16-9-6"], path, temperatures=[1.0, 4.0], chunk_rows=16,
               random_teacher=True, **kwargs)
    return path


def _forge(path: Path, name: str, edit: object) -> None:
    """Apply `edit(array of block 1's rows)` to `name`, then recompute block 1's checksums."""
    with open_store(path, "r+") as store:
        sel = (slice(None),) * S.row_axis(name) + (slice(16, 32),)
        values = store.read(name, sel)
        lse = store.read(S.TOPK_LOGSUMEXP, (sel[0],)) if name == S.TOPK_LOGITS else None
        store.write(name, sel, edit(values) if lse is None else edit(values, lse))
    forge_checksums(path, 1)


def _lse_below_top(lse: np.ndarray) -> np.ndarray:
    lse = lse.copy()
    lse[ROW - 16, :] -= 50  # p = e^50 for the top class
    return lse


def _mass_over_one(z: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Every top-k logit c with c / T <= logsumexp_T at each T (no probability above 1), equal
    to it at one T: the top-k mass there is k."""
    z = z.copy()
    z[ROW - 16, :] = min(lse[ROW - 16, j] * t for j, t in enumerate((1.0, 4.0)))
    return z


def _probs_sum_off(p: np.ndarray) -> np.ndarray:
    p = p.copy()
    p[:, ROW - 16] *= 1.3
    return np.minimum(p, 1)


FORGERIES = [
    ("top-k log-sum-exp below the top logit", {"topk": 3}, S.TOPK_LOGSUMEXP, _lse_below_top,
     "log-sum-exp below"),
    ("top-k mass above 1", {"topk": 3}, S.TOPK_LOGITS, _mass_over_one, "summing to"),
    ("dense probabilities not summing to 1", {}, S.PROBS, _probs_sum_off, "do not sum to 1"),
    ("top-k class ids out of range", {"topk": 3}, S.TOPK_INDICES,
     lambda ids: ids + 6, "class ids outside"),
    ("hybrid class ids past the classes", {"topk": 3, "nucleus": 0.5, "tail": 2},
     S.HYBRID_INDICES, lambda ids: ids + 6, "class ids outside"),
    ("hybrid class ids below the padding", {"topk": 3, "nucleus": 0.5, "tail": 2},
     S.HYBRID_INDICES, lambda ids: ids - 8, "class ids outside"),
]


@pytest.mark.parametrize("what,options,name,edit,words", FORGERIES,
                         ids=[f[0] for f in FORGERIES])
def test_impossible_targets_with_recomputed_checksums_are_refused(
        tmp_path: Path, data: str, what: str, options: dict, name: str, edit: object,
        words: str) -> None:
    path = _made(tmp_path, data, **options)
    _forge(path, name, edit)
    report = verify(path)
    checks = {c.name: c for c in report.checks}
    assert checks["checksums"].ok, "the forged checksums match"
    assert not report.ok and not checks["targets"].ok and words in checks["targets"].detail
    with open_transfer_set(path) as ts:
        ts.read_block(0)
        with pytest.raises(IntegrityError, match=f"block 1 .*{words}"):
            ts.read_block(1)
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-6",
                                      "--transfer-set", str(path), "--out",
                                      str(tmp_path / "m.pt"), "--epochs", "1"])
    assert result.exit_code != 0 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()


def test_an_honest_sparse_set_passes_the_invariants(tmp_path: Path, data: str) -> None:
    path = _made(tmp_path, data, topk=3)
    report = verify(path)
    assert report.ok, report.to_dict()
    with open_transfer_set(path) as ts:
        for b in range(ts.num_blocks):
            ts.read_block(b)


def test_a_downgrade_to_version_1_without_checksums_is_refused(tmp_path: Path,
                                                                data: str) -> None:
    path = _made(tmp_path, data)
    with open_store(path, "r+") as store:  # a flipped value the checksums would have caught
        store.write(S.LOGITS, (slice(ROW, ROW + 1), slice(0, 1)), np.float16(3.0))
    as_version_1(path, downgrade=True)
    with pytest.raises(IntegrityError, match="without block checksums.*digest.*removed"):
        open_transfer_set(path)
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-6",
                                      "--transfer-set", str(path), "--out",
                                      str(tmp_path / "m.pt"), "--epochs", "1"])
    assert result.exit_code != 0 and "checksums were removed" in result.stderr


@pytest.mark.parametrize("classes", [10, 1000, 100_000])
def test_the_row_sum_tolerance_is_decided_in_float64(classes: int) -> None:
    """Dense probabilities are summed in float32 first and the rows near the tolerance again in
    float64: a row off by just over 1e-4 (float32's tolerance) is refused with its float64
    figure, one just under passes, whatever the number of classes."""
    rng = np.random.default_rng(classes)
    p = rng.random((2, 8, classes)) + 0.5
    p /= p.sum(-1, keepdims=True)
    tol = PROBS_SUM_TOLERANCE["float32"]
    for scale, refused in ((1 + 1.2 * tol, True), (1 + 0.8 * tol, False)):
        q = p.copy()
        q[1, 5] *= scale
        q32 = q.astype(np.float32)
        off = abs(float(q32[1, 5].astype(np.float64).sum()) - 1)
        problem = target_problem({S.PROBS: q32}, classes)
        assert (problem is not None) == refused, (scale, problem)
        if refused:
            assert "do not sum to 1" in problem and f"off by {off:.3g}" in problem

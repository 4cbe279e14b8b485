"""`report` and `evaluate --transfer-set` read only the arrays they use, each through a checked
block read, and compute what the whole arrays give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.backends import open_store  # noqa: F401  (loads every backend)
from softlabels.format.chunk_files import ChunkFiles
from softlabels.format.reader import open_transfer_set
from softlabels.format.store import Store
from softlabels.sets.evaluate import evaluate
from softlabels.sets.report import transfer_set_report
from softlabels.sources.load import load_data
from softlabels.teachers.models import build_model
from softlabels.train.metrics import kl_to_teacher, teacher_agreement
from softlabels.train.plans import materialize, predict

BOOKKEEPING = {S.ARRAY_CHECKSUM, S.BLOCK_DONE}
# the backends, by the public interface they implement (their modules are private)
BACKENDS = {cls.__name__: cls for cls in Store.__subclasses__()}
ZarrStore, HDF5Store = BACKENDS["ZarrStore"], BACKENDS["HDF5Store"]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Array name -> the number of rows of each read of it, from either backend (HDF5's
    read_many is the base class's, one read each) or straight from a local set's chunk files."""
    seen: dict[str, list[int]] = {}

    def note(name: str, got: np.ndarray) -> None:
        if name not in BOOKKEEPING:
            seen.setdefault(name, []).append(got.shape[S.row_axis(name)])

    def recording(real):  # noqa: ANN001, ANN202
        def read(self, name, selection=slice(None)):  # noqa: ANN001, ANN202
            got = real(self, name, selection)
            note(name, got)
            return got
        return read

    def read_many(self, requests):  # noqa: ANN001, ANN202
        got = real_many(self, requests)
        for (name, _), a in zip(requests, got):
            note(name, a)
        return got

    def chunk_read(self, selection, scratch=None):  # noqa: ANN001, ANN202
        got = real_chunk(self, selection, scratch)
        if got is not None:  # None: the caller reads through zarr, recorded there
            group = self.folder.parent.name
            note(f"{group}/{self.folder.name}" if group in ("topk", "sample", "seq", "hybrid")
                 else self.folder.name, got)
        return got

    real_many, real_chunk = ZarrStore.read_many, ChunkFiles.read
    assert "read_many" not in HDF5Store.__dict__  # one read each, recorded by `read`
    monkeypatch.setattr(ChunkFiles, "read", chunk_read)  # a local set's chunks, read directly
    monkeypatch.setattr(ZarrStore, "read", recording(ZarrStore.read))
    monkeypatch.setattr(HDF5Store, "read", recording(HDF5Store.read))
    monkeypatch.setattr(ZarrStore, "read_many", read_many)
    return seen


@pytest.fixture(params=["dense", "topk"])
def made(request: pytest.FixtureRequest, npz_data: str, out_path: Path) -> Path:
    """A set with much a report or evaluate does not use: member logits, stored inputs."""
    extra = {"topk": 2} if request.param == "topk" else {"keep_members": True}
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-6-3"], out_path, temperatures=[1, 4],
               chunk_rows=CHUNK, store_inputs=True, **extra, random_teacher=True)
    return out_path


def test_report_reads_labels_and_targets_only(made: Path, tmp_path: Path,
                                              reads: dict[str, list[int]]) -> None:
    with open_transfer_set(made) as ts:
        targets = {S.PROBS} if not ts.target.sparse else {S.TOPK_INDICES, S.TOPK_LOGITS,
                                                    S.TOPK_LOGSUMEXP}
        labels = ts.labels()
        expected = (ts.probs(1.0).argmax(1) == labels).mean()
    reads.clear()
    result = transfer_set_report(made, tmp_path / "report")
    assert set(reads) == {S.LABELS, *targets}, reads
    assert max(max(r) for r in reads.values()) == CHUNK  # block by block
    assert result["accuracy"] == pytest.approx(expected)


def test_evaluate_reads_the_index_and_the_targets_at_t1_only(
        made: Path, npz_data: str, reads: dict[str, list[int]]) -> None:
    model = build_model("mlp:16-3")
    with open_transfer_set(made) as ts:
        targets = {S.PROBS} if not ts.target.sparse else {S.TOPK_INDICES, S.TOPK_LOGITS,
                                                    S.TOPK_LOGSUMEXP}
        teacher = torch.from_numpy(ts.probs(1.0))
        index = ts.index()
    x, _ = materialize(load_data(npz_data))
    logits = predict(model, x, torch.device("cpu"))[torch.from_numpy(index)]
    reads.clear()
    report = evaluate(npz_data, model, transfer_set=made)
    # index and sample_hash also go whole to the alignment check against the DATA
    used = {n for n, r in reads.items() if min(r) <= CHUNK}
    assert used == {S.INDEX, *targets} | ({S.SAMPLE_HASH} & used), reads
    assert set(reads) <= {S.INDEX, S.SAMPLE_HASH, *targets}, reads
    assert report["teacher_agreement"] == pytest.approx(teacher_agreement(logits, teacher))
    assert report["kl_to_teacher"] == pytest.approx(kl_to_teacher(logits, teacher))

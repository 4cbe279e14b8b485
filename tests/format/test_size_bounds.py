"""Bounded reading: a small set whose metadata claims a huge number of rows is refused on
opening, before any column is read (it made `train` allocate gigabytes of fill values)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.layout import DIGEST, Layout, digest
from softlabels.format.reader import open_transfer_set

CLAIMED = 100_000_000


def _claim_rows(path: Path, rows: int) -> None:
    """Rewrite a Zarr set's metadata (root and every array's shape, digest recomputed) to
    declare `rows` rows, as a forger would; no chunk is added."""
    root = json.loads((path / "zarr.json").read_text())
    meta = root["attributes"][S.ATTR_KEY]
    meta["num_rows"] = meta["num_examples"] = rows
    specs = Layout.from_meta(meta).specs()
    meta[DIGEST] = digest(meta)
    (path / "zarr.json").write_text(json.dumps(root))
    for name, spec in specs.items():
        array = path / name / "zarr.json"
        doc = json.loads(array.read_text())
        doc["shape"] = list(spec.shape)
        array.write_text(json.dumps(doc))
    checksums = path / S.ARRAY_CHECKSUM / "zarr.json"
    doc = json.loads(checksums.read_text())
    doc["shape"][0] = specs[S.BLOCK_DONE].shape[0]
    checksums.write_text(json.dumps(doc))


def test_a_small_set_claiming_1e8_rows_is_refused_before_any_allocation(
        tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    path = tmp_path / "s.zarr"
    precompute(data, ["mlp:16-3"], path, temperatures=[2.0], random_teacher=True)
    _claim_rows(path, CLAIMED)
    with pytest.raises(IntegrityError, match=f"declares {CLAIMED} rows .* stores only"):
        open_transfer_set(path)
    result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-3",
                                      "--transfer-set", str(path), "--out",
                                      str(tmp_path / "m.pt")])
    assert result.exit_code != 0 and "stores only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_honest_set_is_not_measured_below_the_threshold(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", n=40)
    path = tmp_path / "s.zarr"
    precompute(data, ["mlp:16-3"], path, temperatures=[2.0], random_teacher=True)
    with open_transfer_set(path) as ts:
        assert ts.num_rows == 40


def test_a_tiny_checkpoint_naming_a_huge_mlp_is_refused_before_allocation(
        tmp_path: Path) -> None:
    import torch

    from softlabels.errors import SpecError
    from softlabels.teachers.models import build_model, load_checkpoint, save_checkpoint

    path = tmp_path / "m.pt"
    save_checkpoint(build_model("mlp:16-3"), path, spec="mlp:16-3")
    payload = torch.load(path, weights_only=True)
    payload["model_spec"] = "mlp:16-30000-30000-3"  # 900 M weights: 3.6 GB if built
    torch.save(payload, path)
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(SpecError, match="has 90.* weights, the file holds 51"):
        load_checkpoint(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20


@pytest.mark.parametrize("member", ["logits/c/1/0", "zarr.json"])
def test_a_zip_member_inflating_past_its_array_is_refused_before_decompression(
        tmp_path: Path, member: str) -> None:
    import zipfile

    from softlabels.format.operations import convert

    data = make_npz(tmp_path / "d.npz", n=40)
    precompute(data, ["mlp:16-3"], tmp_path / "s.zarr", temperatures=[2.0], chunk_rows=16,
               random_teacher=True)
    packed = tmp_path / "s.zarr.zip"
    convert(tmp_path / "s.zarr", packed)
    bomb = tmp_path / "bomb.zarr.zip"
    with zipfile.ZipFile(packed) as src, zipfile.ZipFile(bomb, "w") as out:
        for info in src.infolist():
            if info.filename == member:  # 8 MiB of zeros, about 8 KB deflated
                body = b" " * (8 << 20) if member.endswith("json") else bytes(8 << 20)
                out.writestr(member, body, compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, src.read(info))
    assert bomb.stat().st_size < packed.stat().st_size + (64 << 10)
    with pytest.raises(IntegrityError, match=f"member {member} inflates to {8 << 20} bytes"):
        open_transfer_set(bomb)
    with open_transfer_set(packed) as ts:  # the honest one opens
        assert ts.num_rows == 40

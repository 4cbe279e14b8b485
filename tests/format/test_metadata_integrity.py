"""Edited metadata is detected: the identity digest (checked on opening, so stage two refuses)
and the stored probabilities against the stored logits at the recorded temperatures."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest
import zarr
from click.testing import CliRunner

from conftest import CHUNK, ROOT
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError, TransferSetError
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the metadata with plain zarr / h5py, as a careless colleague would."""
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            meta = json.loads(f.attrs["softlabels"])
            change(meta)
            f.attrs["softlabels"] = json.dumps(meta)
    else:
        g = zarr.open_group(path, mode="r+")
        meta = dict(g.attrs["softlabels"])
        change(meta)
        g.attrs["softlabels"] = meta


def checks(path: Path) -> dict[str, Any]:
    return {c.name: c for c in verify(path).checks}


def set_temperatures(meta: dict[str, Any]) -> None:
    meta["temperatures"] = [1.0, 5.0]


def set_weights(meta: dict[str, Any]) -> None:
    meta["teacher"]["members"][0]["sha256"] = "0" * 64


def set_combine(meta: dict[str, Any]) -> None:
    meta["teacher"]["combine"] = "mean-probs"


@pytest.mark.parametrize("change,key", [(set_temperatures, "temperatures"),
                                        (set_weights, "teacher"), (set_combine, "teacher")])
def test_an_edited_identity_field_fails_verify_and_train_names_it(
        tmp_path: Path, npz_data: str, out_path: Path,
        change: Callable[[dict[str, Any]], None], key: str) -> None:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    assert verify(out_path).ok
    edit(out_path, change)
    report = checks(out_path)
    assert not report["metadata"].ok and key in report["metadata"].detail
    with pytest.raises(IntegrityError, match=key):
        open_transfer_set(out_path)
    result = CliRunner().invoke(cli, ["verify", str(out_path)])
    assert result.exit_code != 0 and key in result.output
    result = CliRunner().invoke(cli, ["train", "--data", npz_data, "--model", "mlp:16-4-3",
                                      "--transfer-set", str(out_path), "--epochs", "1",
                                      "--out", str(tmp_path / "s.pt")])
    assert result.exit_code != 0 and not (tmp_path / "s.pt").exists()
    assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output + result.stderr


def test_temperatures_edited_and_digest_dropped_fail_the_tempering_check(
        out_path: Path, npz_data: str) -> None:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4, 20], chunk_rows=CHUNK,
               random_teacher=True)

    def swap(meta: dict[str, Any]) -> None:
        meta["temperatures"] = [1.0, 5.0, 20.0]
        del meta["digest"]

    edit(out_path, swap)
    report = checks(out_path)
    assert "no digest" in report["metadata"].detail  # read as a set from before digests
    bad = report["temperatures"]
    assert not bad.ok and "T=5" in bad.detail and "T=20" not in bad.detail
    assert not verify(out_path).ok


def test_tempering_check_passes_untouched_sets_and_says_what_it_cannot_check(
        tmp_path: Path, npz_data: str) -> None:
    common = dict(temperatures=[1, 4], chunk_rows=CHUNK, combine="mean-probs")
    teachers = ["mlp:16-8-3", "mlp:16-5-3"]
    precompute(npz_data, teachers, tmp_path / "kept.zarr", keep_members=True, **common,
               random_teacher=True)
    precompute(npz_data, teachers, tmp_path / "lost.zarr", **common, random_teacher=True)
    precompute(npz_data, teachers[:1], tmp_path / "topk.zarr", temperatures=[1, 4], topk=2,
               random_teacher=True)
    kept, lost = checks(tmp_path / "kept.zarr"), checks(tmp_path / "lost.zarr")
    assert kept["temperatures"].ok and "T = 1, 4" in kept["temperatures"].detail
    assert lost["temperatures"].ok and "not checkable at T = 4" in lost["temperatures"].detail
    assert "not checkable" in checks(tmp_path / "topk.zarr")["temperatures"].detail


def test_edited_logits_fail_the_tempering_check(tmp_path: Path, npz_data: str) -> None:
    path = tmp_path / "s.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               dtype="float32", random_teacher=True)
    g = zarr.open_group(path, mode="r+")
    g["logits"][20] = g["logits"][20] * 1.25  # checksums still fail too: both say so
    report = checks(path)
    assert not report["temperatures"].ok and "row 20" in report["temperatures"].detail


@pytest.mark.parametrize("opts,name", [({"views": 2, "augment": "hflip"}, "view_seed"),
                                       ({"store_inputs": True}, "inputs"),
                                       ({"keep_members": True}, "member_logits"),
                                       ({"topk": 2}, "topk/logsumexp")])
def test_verify_checks_exactly_the_arrays_the_metadata_implies(
        tmp_path: Path, npz_data: str, opts: dict[str, Any], name: str) -> None:
    path = tmp_path / "s.h5"
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-5-3"], path, temperatures=[1, 4],
               chunk_rows=CHUNK, **opts, random_teacher=True)
    with h5py.File(path, "r+") as f:
        f.create_dataset("extra", data=[1, 2, 3])
    assert "extra: not implied by the metadata" in checks(path)["arrays"].detail
    with h5py.File(path, "r+") as f:
        del f["extra"], f[name]
    missing = checks(path)["arrays"]
    assert not missing.ok and f"{name}: expected" in missing.detail and "found nothing" in \
        missing.detail
    with pytest.raises(IntegrityError, match=f"{name}: expected") as err:
        open_transfer_set(path)  # stage two and the set operations refuse it on opening
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key,value,found", [
    ("num_rows", 5, "labels: expected (5,)"), ("num_classes", 7, "logits: expected (206, 7)"),
    ("sparse", {"kind": "topk", "k": 1}, "topk/indices: expected"),
    ("views", None, "view_seed: not implied"), ("keep_members", True, "member_logits"),
    ("inputs", {"shape": [1, 4, 4], "dtype": "float32"}, "inputs: expected"),
    ("temperatures", "abc", "temperatures must be"), ("block_rows", 5, "block_rows 5"),
    ("teacher", None, "teacher: expected"), ("dataset", [], "dataset: expected"),
    ("num_examples", "103", "num_examples"), ("augment", None, "augment"),
])
def test_a_set_without_digest_whose_metadata_disagrees_is_refused_in_one_line(
        tmp_path: Path, npz_data: str, key: str, value: Any, found: str) -> None:
    """Sets from before digests: the metadata still has to describe the arrays stored."""
    path = tmp_path / "v.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK, views=2,
               augment="hflip", random_teacher=True)

    def change(meta: dict[str, Any]) -> None:
        meta[key] = value
        del meta["digest"]

    edit(path, change)
    with pytest.raises(TransferSetError) as err:
        open_transfer_set(path)
    assert found in str(err.value) and "\n" not in str(err.value)
    assert not verify(path).ok


def test_an_array_without_its_metadata_is_one_line_without_zarr_warnings(
        tmp_path: Path, npz_data: str) -> None:
    """A Zarr set missing one array's zarr.json: the command's only output is its error line
    (zarr's warning about the leftover chunk folder is not shown to the user)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    (path / "probs" / "zarr.json").unlink()
    done = subprocess.run([sys.executable, "-m", "softlabels", "info", str(path)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "probs" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_more_class_names_than_classes_is_malformed_even_with_a_fresh_digest(
        npz_data: str, out_path: Path) -> None:
    """A writer elsewhere that records 3,000 class names for a 10-class set and recomputes the
    digest as FORMAT.md says: refused on opening, in one line (it verified, trained and was
    copied by subset before)."""
    from softlabels.format.layout import DIGEST, digest

    path = out_path
    precompute(npz_data, ["mlp:16-8-3"], path, chunk_rows=CHUNK, random_teacher=True)

    def names(meta: dict[str, Any]) -> None:
        meta["class_names"] = [f"c{i}" for i in range(3000)]
        meta[DIGEST] = digest(meta)
    edit(path, names)
    with pytest.raises(TransferSetError, match=r"class_names: 3000 names for 3 classes"):
        open_transfer_set(path)
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code != 0 and "3000 names for 3 classes" in result.output


@pytest.mark.parametrize("head, tail", [(4, 2), (2, 4)])
def test_a_hybrid_head_size_edited_with_its_digest_is_refused_by_readers(
        out_path: Path, npz_data: str, head: int, tail: int) -> None:
    """The same arrays read as a hybrid of another head size are other targets: every reader
    checks the codec's recipe on a block's first read, as verify does (training on them ran
    to the end before, on wrongly decoded targets)."""
    from softlabels.format.layout import DIGEST, digest

    precompute(npz_data, ["mlp:16-8-10"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               topk=3, nucleus=0.5, tail=3, random_teacher=True)

    def resize(meta: dict[str, Any]) -> None:
        meta["sparse"].update(k=head, tail=tail)
        meta[DIGEST] = digest(meta)
    edit(out_path, resize)
    with open_transfer_set(out_path) as ts, pytest.raises(
            IntegrityError, match=r"block 0 .* holds hybrid targets that break its recipe"):
        ts.read_block(0, temperature=4.0)
    result = CliRunner().invoke(cli, ["train", "--data", npz_data, "--model", "mlp:16-8-10",
                                      "--transfer-set", str(out_path), "--temperature", "4",
                                      "--epochs", "1", "--out", str(out_path.parent / "s.pt")])
    assert result.exit_code == 1 and "break its recipe" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not checks(out_path)["hybrid"].ok


@pytest.mark.parametrize("field,value", [("data_type", "int32"), ("shape", "abc"),
                                         ("dimension_names", [1, 2, 3]),
                                         ("node_type", "group"), ("fill_value", [1, 2])])
def test_array_metadata_zarr_cannot_parse_is_one_line(
        tmp_path: Path, npz_data: str, field: str, value: Any) -> None:
    """Edits of an array's zarr.json on which zarr raises TypeError (an int32 data type beside
    the NaN fill of floats, a shape that is not a list of integers, ...) end `info` in one
    line naming the damaged metadata, and `verify` in a failed report, not in zarr's
    traceback."""
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    meta_file = path / "probs" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta[field] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(TransferSetError, match="metadata \\(zarr.json\\) is damaged"):
        open_transfer_set(path)
    info = CliRunner().invoke(cli, ["info", str(path)])
    assert info.exit_code == 1 and len(info.output.strip().splitlines()) == 1, info.output
    assert "zarr.json) is damaged" in info.output
    report = CliRunner().invoke(cli, ["verify", str(path)])
    assert report.exit_code == 1 and "Traceback" not in report.output, report.output
    assert report.output.startswith("FAIL status: ") and "zarr.json) is damaged" in report.output

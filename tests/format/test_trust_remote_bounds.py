"""Bounded reading at a URL (issue 23 item 8): a metadata object over http is read with a size
bound (an endless or huge body is cut and refused in one line, not held until the deadline);
a chunk larger than its array can hold is refused; S3 requests have a whole-request deadline
(botocore's read timeout restarted at each byte)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hostile_servers import hostile, serve_folder

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import TransferSetError
from softlabels.format.remote_reads import (
    MAX_METADATA_BYTES,
    MAX_OBJECT_BYTES,
    ReadBounds,
    _deadline_cat,
)


def run(*args: object) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output, time.perf_counter() - t0


@pytest.mark.parametrize("kind", ["flood", "endless"])
def test_an_endless_metadata_body_is_cut_at_its_bound(kind: str) -> None:
    # before: read for the whole deadline (2 GB held after 5 s), then "no answer"
    pytest.importorskip("aiohttp")
    with hostile(kind) as where:
        code, out, took = run("--timeout", "30", "info", f"http://{where}/set.zarr")
    assert code == 1 and took < 20, (took, out)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    assert f"http://{where}/set.zarr/" in out and "more than metadata ever takes" in out
    assert str(MAX_METADATA_BYTES) in out and "check the URL" in out


@pytest.fixture
def served_set(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    data = make_npz(tmp_path / "d.npz", n=30)
    precompute(data, ["mlp:16-3"], root / "set.zarr", temperatures=[2.0], random_teacher=True)
    return root


def test_a_chunk_larger_than_its_array_can_hold_is_refused(served_set: Path,
                                                           tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    chunk = next(p for p in (served_set / "set.zarr" / "logits").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(np.random.default_rng(0).bytes(4 << 20))  # 4 MiB for 30 x 3 logits
    with serve_folder(served_set) as base:
        code, out, _ = run("convert", f"{base}/set.zarr", "--out", tmp_path / "copy.zarr")
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in out.split("Error: ")[-1], out
    assert "more than an object of this set can hold" in errors[0] and "logits" in errors[0]


def test_a_served_set_still_reads(served_set: Path, tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    with serve_folder(served_set) as base:
        code, out, _ = run("convert", f"{base}/set.zarr", "--out", tmp_path / "copy.zarr")
    assert code == 0, out
    assert run("verify", tmp_path / "copy.zarr")[0] == 0


def test_an_s3_endpoint_trickling_a_body_is_given_up_on_at_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # before: botocore's read timeout restarted at each byte: still running after 60 s
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem.clear_instance_cache()  # none made for another endpoint is reused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with hostile("slow-body", every=0.2) as where:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{where}")
        code, out, took = run("--timeout", "2", "info", "s3://bucket/set.zarr")
    assert code == 1 and took < 30, (took, out)
    s3fs.S3FileSystem.clear_instance_cache()  # nor this one, by a later test
    assert f"no answer from {where}" in out and "within 2 s" in out, out
    assert len(out.strip().splitlines()) == 1


def test_bounds_by_kind_of_object() -> None:
    bounds = ReadBounds()
    assert bounds.limit("b/set.zarr/zarr.json") == MAX_METADATA_BYTES
    assert bounds.limit("b/set.zarr.lock") == MAX_METADATA_BYTES
    assert bounds.limit("b/set.zarr/logits/c/0/0") == MAX_OBJECT_BYTES
    bounds.learn("b/set.zarr/logits/zarr.json", b'{"node_type": "array", "data_type": '
                 b'"float32", "chunk_grid": {"configuration": {"chunk_shape": [512, 10]}}}')
    assert bounds.limit("b/set.zarr/logits/c/0/0") == 2 * 512 * 10 * 4 + (64 << 10)
    assert bounds.limit("b/set.zarr/logits/c/0/0", 0, 100) == 100
    assert bounds.limit("b/set.zarr/logits/c/0/0", -16) == 16
    bounds.learn("b/set.zarr/labels/zarr.json", b"not json")  # ignored: opening says so
    assert bounds.limit("b/set.zarr/labels/c/0") == MAX_OBJECT_BYTES


def test_an_object_store_read_has_a_whole_object_deadline() -> None:
    async def slow(path: str, start=None, end=None) -> bytes:
        await asyncio.sleep(10)
        return b""

    async def main() -> None:
        await _deadline_cat(slow, ReadBounds(), lambda: 0.2, "b/set.zarr/zarr.json")

    t0 = time.perf_counter()
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    assert time.perf_counter() - t0 < 5

    async def big(path: str, start=None, end=None) -> bytes:
        return b"{" * (MAX_METADATA_BYTES + 1)

    with pytest.raises(TransferSetError, match="more than metadata ever takes"):
        asyncio.run(_deadline_cat(big, ReadBounds(), lambda: 5, "b/set.zarr/zarr.json"))

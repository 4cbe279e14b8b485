"""The command line, through click's CliRunner: summaries, JSON, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CHUNK, N_ROWS
from softlabels.cli import cli


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_precompute_info_verify(npz_data: str, out_path: Path) -> None:
    code, out, err = run("precompute", "--data", npz_data, "--teacher", "mlp:16-8-3",
                         "--teacher", "mlp:16-4-3", "--out", str(out_path),
                         "--temperatures", "1,4,20", "--chunk-rows", str(CHUNK), "--keep-members",
                         "--random-teacher")
    assert code == 0, err
    assert f"{N_ROWS} rows x 3 classes at T=1,4,20" in out
    code, out, _ = run("info", str(out_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["num_rows"] == N_ROWS and info["status"] == "complete"
    assert info["arrays"]["member_logits"]["shape"] == [2, N_ROWS, 3]
    assert len(info["teacher"]["members"]) == 2
    code, out, _ = run("info", str(out_path))
    assert code == 0 and "fingerprint" in out and "mlp:16-4-3" in out
    code, out, _ = run("verify", str(out_path), "--data", npz_data, "--teacher", "mlp:16-8-3",
                       "--teacher", "mlp:16-4-3", "--sample", "20")
    assert code == 0 and out.strip().endswith("verified")
    code, out, _ = run("verify", str(out_path), "--json")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("args, message", [
    (["precompute", "--data", "npz:missing.npz", "--teacher", "mlp:16-3", "--out", "o.zarr",
      "--random-teacher"],
     "no such file"),
    (["precompute", "--data", "weird", "--teacher", "mlp:16-3", "--out", "o.zarr",
      "--random-teacher"],
     "valid forms: npz:PATH"),
    (["precompute", "--data", "npz:DATA", "--teacher", "nope:x", "--out", "o.zarr",
      "--random-teacher"],
     "unknown MODEL scheme"),
    (["precompute", "--data", "npz:DATA", "--teacher", "mlp:16-3", "--out", "o.zarr",
      "--temperatures", "-1", "--random-teacher"], "temperatures must be positive"),
    (["precompute", "--data", "npz:DATA", "--teacher", "mlp:16-3", "--out", "o.zarr",
      "--temperatures", "a,b", "--random-teacher"], "comma-separated list of numbers"),
    (["precompute", "--data", "npz:DATA", "--teacher", "mlp:16-3", "--out", "o.zarr",
      "--batch-size", "0", "--random-teacher"], "batch size must be positive"),
    (["precompute", "--data", "npz:DATA", "--teacher", "mlp:16-3", "--teacher", "mlp:16-4",
      "--out", "o.zarr", "--random-teacher"], "disagree on the number of classes"),
    (["info", "nowhere.zarr"], "does not exist"),
    (["verify", "SET", "--teacher", "mlp:16-3"], "--teacher needs --data"),
])
def test_bad_input_is_one_line(tmp_path: Path, npz_data: str, args: list[str],
                               message: str) -> None:
    set_path = tmp_path / "s.zarr"
    run("precompute", "--data", npz_data, "--teacher", "mlp:16-3", "--out", str(set_path),
        "--random-teacher")
    args = [a.replace("npz:DATA", npz_data).replace("SET", str(set_path))
            .replace("o.zarr", str(tmp_path / "o.zarr")) for a in args]
    code, out, err = run(*args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "o.zarr").exists()  # nothing written for any bad input


def test_info_refuses_incomplete_and_unknown_version(npz_data: str, tmp_path: Path) -> None:
    from softlabels.format.backends import open_store

    path = tmp_path / "s.zarr"
    run("precompute", "--data", npz_data, "--teacher", "mlp:16-3", "--out", str(path),
        "--random-teacher")
    with open_store(path, "r+") as store:
        meta = store.get_meta()
        store.set_meta({**meta, "status": "writing"})
    code, _, err = run("info", str(path))
    assert code == 1 and "incomplete" in err and "rerun the same" in err
    with open_store(path, "r+") as store:
        store.set_meta({**meta, "format_version": 99})
    code, _, err = run("info", str(path))
    assert code == 1 and "format_version 99" in err
    code, out, _ = run("verify", str(path))
    assert code == 1 and "FAIL status" in out


def test_verify_detects_edited_data_and_values(npz_data: str, tmp_path: Path) -> None:
    from softlabels.format.backends import open_store

    path = tmp_path / "s.zarr"
    run("precompute", "--data", npz_data, "--teacher", "mlp:16-3", "--out", str(path),
        "--chunk-rows", str(CHUNK), "--random-teacher")
    edited = tmp_path / "edited.npz"
    with np.load(npz_data[4:]) as f:
        x, y = f["x"].copy(), f["y"]
    x[40] += 1
    np.savez(edited, x=x, y=y)
    code, out, _ = run("verify", str(path), "--data", f"npz:{edited}")
    assert code == 1 and "1 of 103 rows do not match the dataset (first: row 40" in out
    with open_store(path, "r+") as store:
        store.write("logits", (slice(50, 51),), np.full((1, 3), np.nan))
    code, out, _ = run("verify", str(path))
    assert code == 1 and "logits has NaN/inf at row 50" in out
    assert "FAIL checksums: block 3 (rows 48-63) does not match its checksum" in out


@pytest.mark.parametrize("suffix, array", [("zarr", "probs"), ("zarr", "labels"),
                                           ("h5", "logits")])
def test_verify_names_the_block_of_a_flipped_byte(npz_data: str, tmp_path: Path,
                                                  suffix: str, array: str) -> None:
    """Flip one byte in the stored file(s) of the data: verify names the block, no traceback."""
    path = tmp_path / f"s.{suffix}"
    run("precompute", "--data", npz_data, "--teacher", "mlp:16-3", "--out", str(path),
        "--chunk-rows", str(CHUNK), "--dtype", "float32", "--random-teacher")
    if array == "probs":  # uncompressed floats: the value changes
        target = path / "probs" / "c" / "0" / "2" / "0"  # T index 0, block 2
        offset = 100
    elif array == "labels":  # zstd-compressed: the chunk no longer decodes
        target = path / "labels" / "c" / "2"
        offset = len(target.read_bytes()) // 2
    else:
        import h5py

        with h5py.File(path, "r") as f:  # the byte offset of block 2 of logits
            offset = f["logits"].id.get_chunk_info_by_coord((2 * CHUNK, 0)).byte_offset + 8
        target = path
    data = bytearray(target.read_bytes())
    data[offset] ^= 0x40
    target.write_bytes(bytes(data))
    code, out, err = run("verify", str(path))
    assert code == 1, out
    assert f"FAIL checksums: block 2 (rows {2 * CHUNK}-{3 * CHUNK - 1})" in out
    assert "Traceback" not in out + err

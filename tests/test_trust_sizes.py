"""Absurd sizes from an option or a file are refused in one line before anything is allocated
(issue 23): `import --num-classes 10^12`, `--chunk-rows`/`--shard-rows` of 10^12 (they
allocated terabytes: a traceback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.errors import OptionError
from softlabels.options import MAX_CLASSES, PrecomputeOptions, check_num_classes

HUGE = "1000000000000"


def _one_line(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_import_topk_with_an_absurd_class_count_is_refused(tmp_path: Path) -> None:
    # before: a set of 10^12 classes was laid out (and, with valid values, written complete)
    data = make_npz(tmp_path / "d.npz", n=10)
    np.save(tmp_path / "i.npy", np.tile(np.arange(2, dtype=np.int32), (10, 1)))
    np.save(tmp_path / "v.npy", np.log(np.full((10, 2), 0.3, np.float32)))
    out = tmp_path / "o.zarr"
    args = ["import", "--out", str(out), "--data", data, "--teacher-name", "t",
            "--topk-indices", str(tmp_path / "i.npy"), "--topk-values", str(tmp_path / "v.npy")]
    _one_line(CliRunner().invoke(cli, [*args, "--num-classes", HUGE]), "--num-classes",
              str(MAX_CLASSES), HUGE, "int32")
    assert not out.exists()
    ok = CliRunner().invoke(cli, [*args, "--num-classes", "1000"])
    assert ok.exit_code == 0, ok.output


def test_import_logits_with_another_class_count_is_refused(tmp_path: Path) -> None:
    # before: --num-classes was ignored silently beside --logits
    data = make_npz(tmp_path / "d.npz", n=10)
    np.save(tmp_path / "z.npy", np.zeros((10, 3), np.float32))
    result = CliRunner().invoke(cli, ["import", "--out", str(tmp_path / "o.zarr"), "--data",
                                      data, "--teacher-name", "t", "--logits",
                                      str(tmp_path / "z.npy"), "--num-classes", HUGE])
    _one_line(result, "3 columns", "--num-classes")


@pytest.mark.parametrize("option", ["--chunk-rows", "--shard-rows"])
def test_precompute_with_an_absurd_chunk_is_refused(option: str, tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", n=10)
    result = CliRunner().invoke(cli, ["precompute", "--data", data, "--teacher", "mlp:16-3",
                                      "--random-teacher", "--out", str(tmp_path / "p.zarr"),
                                      option, HUGE])
    _one_line(result, option, HUGE)
    assert not (tmp_path / "p.zarr").exists()


def test_class_counts() -> None:
    assert check_num_classes(10, "C") == 10
    for bad in (True, 1, 0, -3, 2.5, MAX_CLASSES + 1, "10"):
        with pytest.raises(OptionError, match="whole number"):
            check_num_classes(bad, "C")
    with pytest.raises(OptionError):
        check_num_classes(5, "C", above=5)  # top-k of 5 needs more than 5 classes
    assert PrecomputeOptions(chunk_rows=1 << 24).chunk_rows == 1 << 24


def test_an_npz_whose_header_claims_more_than_it_stores_is_refused(tmp_path: Path) -> None:
    # before: numpy allocated the claim first: "Unable to allocate 58.2 TiB" (a traceback)
    import io
    import zipfile

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                        "shape": (10**12, 16)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 1024)
    result = CliRunner().invoke(cli, ["precompute", "--data", f"npz:{tmp_path / 'bomb.npz'}",
                                      "--teacher", "mlp:16-3", "--random-teacher", "--out",
                                      str(tmp_path / "p.zarr")])
    _one_line(result, "claims shape (1000000000000, 16)", "stores 1024 bytes",
              "nothing was allocated")
    np.savez_compressed(tmp_path / "ok.npz", x=np.zeros((40, 16), np.float32))  # compressed
    from softlabels.sources.arrays import NpzDataset

    assert len(NpzDataset(tmp_path / "ok.npz")) == 40


def test_an_index_file_claiming_terabytes_is_one_line(tmp_path: Path) -> None:
    # before: "numpy._core._exceptions._ArrayMemoryError: Unable to allocate 7.28 TiB" (traceback)
    from numpy.lib import format as npy

    data = make_npz(tmp_path / "d.npz", n=30)
    assert CliRunner().invoke(cli, ["precompute", "--data", data, "--teacher", "mlp:16-3",
                                    "--random-teacher", "--out", str(tmp_path / "a.zarr")]
                              ).exit_code == 0
    with open(tmp_path / "forged.npy", "wb") as f:
        npy.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False,
                                       "shape": (10**15,)})
        f.write(b"\0" * 80)
    result = CliRunner().invoke(cli, ["subset", str(tmp_path / "a.zarr"), "--out",
                                      str(tmp_path / "s.zarr"), "--indices",
                                      str(tmp_path / "forged.npy")])
    _one_line(result, "cannot read indices from", "forged.npy")

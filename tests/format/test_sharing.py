"""merge, subset and convert: new sets that are what a user expects, and record their origin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CHUNK, N_ROWS, make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sets.verify import verify
from softlabels.teachers.models import build_model, save_checkpoint
from softlabels.train.datasets import SoftTargetDataset

ROW_ARRAYS = (S.LOGITS, S.PROBS, S.LABELS, S.INDEX, S.SAMPLE_HASH)


def run(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def teachers(tmp_path: Path) -> list[str]:
    paths = []
    for k, spec in enumerate(["mlp:16-8-3", "mlp:16-6-3", "mlp:16-5-3"]):
        path = tmp_path / f"t{k}.pt"
        save_checkpoint(build_model(spec), path, spec=spec)
        paths.append(str(path))
    return paths


def same(a: Path, b: Path, names: tuple[str, ...] = ROW_ARRAYS, ulp: bool = False) -> None:
    """Arrays equal; with `ulp`, floats may differ by float32 rounding (1e-7 relative)."""
    with open_transfer_set(a) as x, open_transfer_set(b) as y:
        for name in names:
            u, v = x.read(name), y.read(name)
            if ulp and u.dtype.kind == "f":
                np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7, err_msg=name)
            else:
                np.testing.assert_array_equal(u, v, err_msg=name)


@pytest.mark.parametrize("combine", ["mean-logits", "mean-probs"])
def test_merge_equals_precomputing_all_teachers_at_once(tmp_path: Path, npz_data: str,
                                                        combine: str) -> None:
    t = teachers(tmp_path)
    args = dict(temperatures=[1, 4], chunk_rows=CHUNK, dtype="float32", combine=combine)
    precompute(npz_data, t[:2], tmp_path / "a.zarr", keep_members=True, **args, random_teacher=True)
    precompute(npz_data, t[2:], tmp_path / "b.h5", **args, random_teacher=True)
    precompute(npz_data, t, tmp_path / "all.zarr", keep_members=True, **args, random_teacher=True)
    code, out, err = run("merge", tmp_path / "a.zarr", tmp_path / "b.h5", "--out",
                         tmp_path / "m.zarr", "--combine", combine)
    assert code == 0, err
    # mean-logits: bit for bit; mean-probs: its logsumexp may round differently in the last bit
    same(tmp_path / "m.zarr", tmp_path / "all.zarr", ROW_ARRAYS + (S.MEMBER_LOGITS,),
         ulp=combine == "mean-probs")
    with open_transfer_set(tmp_path / "m.zarr") as m:
        assert len(m.meta["teacher"]["members"]) == 3
        assert [s["path"] for s in m.meta["provenance"]["merged_from"]] == [
            str(tmp_path / "a.zarr"), str(tmp_path / "b.h5")]
    assert verify(tmp_path / "m.zarr", data=npz_data).ok
    code, out, _ = run("info", tmp_path / "m.zarr")
    assert "merged from" in out


def test_merge_refuses_other_data_classes_or_order(tmp_path: Path, npz_data: str) -> None:
    base = tmp_path / "base.zarr"
    precompute(npz_data, ["mlp:16-3"], base, chunk_rows=CHUNK, random_teacher=True)
    other = make_npz(tmp_path / "o.npz", seed=9)
    precompute(other, ["mlp:16-3"], tmp_path / "other.zarr", chunk_rows=CHUNK, random_teacher=True)
    precompute(npz_data, ["mlp:16-4"], tmp_path / "four.zarr", chunk_rows=CHUNK,
               random_teacher=True)
    # the same examples in another row order: rows would pair different examples
    with np.load(npz_data[4:]) as f:
        perm = np.random.default_rng(1).permutation(len(f["x"]))
        np.savez(tmp_path / "perm.npz", x=f["x"][perm], y=f["y"][perm])
    precompute(f"npz:{tmp_path}/perm.npz", ["mlp:16-3"], tmp_path / "order.zarr",
               chunk_rows=CHUNK, random_teacher=True)
    code, _, err = run("subset", base, "--out", tmp_path / "half.zarr", "--fraction", 0.5)
    assert code == 0, err  # the same data, but only some of its rows
    for second, message in (("other.zarr", "dataset fingerprint differs"),
                            ("four.zarr", "number of classes differs"),
                            ("order.zarr", "dataset fingerprint differs"),
                            ("half.zarr", "dataset fingerprint differs")):
        for pair in ((base, tmp_path / second), (tmp_path / second, base)):
            code, _, err = run("merge", *pair, "--out", tmp_path / "m.zarr")
            assert code == 1 and message in err and "Traceback" not in err, (second, err)
            assert not (tmp_path / "m.zarr").exists()


def test_subset_keeps_index_and_trains_with_the_original_data(tmp_path: Path,
                                                              npz_data: str) -> None:
    src = tmp_path / "s.zarr"
    precompute(npz_data, ["mlp:16-8-3"], src, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    code, out, err = run("subset", src, "--out", tmp_path / "no2.h5", "--exclude-classes", "2")
    assert code == 0, err
    with open_transfer_set(src) as a, open_transfer_set(tmp_path / "no2.h5") as b:
        keep = np.flatnonzero(a.labels() != 2)
        assert b.index().tolist() == a.index()[keep].tolist()
        np.testing.assert_array_equal(b.probs(4.0), a.probs(4.0)[keep])
        assert b.meta["provenance"]["subset_of"]["exclude_classes"] == [2]
        assert b.meta["num_examples"] == N_ROWS
    ds = SoftTargetDataset(npz_data, tmp_path / "no2.h5", temperature=4.0)  # joins by index
    assert len(ds) == len(keep)
    code, _, err = run("subset", src, "--out", tmp_path / "none.zarr", "--classes", "0",
                       "--exclude-classes", "0")
    assert code == 1 and "select no rows" in err and not (tmp_path / "none.zarr").exists()


@pytest.mark.parametrize("target", ["c.h5", "c.zarr", "c.zarr.zip"])
def test_convert_is_identical_and_zip_reads_in_place(tmp_path: Path, npz_data: str,
                                                     target: str) -> None:
    src = tmp_path / ("s.zarr" if target != "c.zarr" else "s.h5")
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-4-3"], src, temperatures=[1, 3],
               chunk_rows=CHUNK, keep_members=True, random_teacher=True)
    code, _, err = run("convert", src, "--out", tmp_path / target)
    assert code == 0, err
    same(tmp_path / target, src, ROW_ARRAYS + (S.MEMBER_LOGITS,))
    with open_transfer_set(tmp_path / target) as c, open_transfer_set(src) as s:
        assert c.meta["teacher"] == s.meta["teacher"]
        assert c.meta["dataset"] == s.meta["dataset"]
    report = verify(tmp_path / target, data=npz_data)
    assert report.ok, report.to_dict()
    code, out, err = run("convert", src, "--out", tmp_path / target)  # the same command again
    assert code == 0 and "already complete" in out and "nothing to do" in out, err
    other = tmp_path / "other.zarr"
    precompute(npz_data, ["mlp:16-4-3"], other, temperatures=[1, 3], chunk_rows=CHUNK,
               random_teacher=True)
    code, _, err = run("convert", other, "--out", tmp_path / target)  # another source
    assert code == 1 and "already exists" in err


def test_zip_set_cannot_be_written(tmp_path: Path, npz_data: str) -> None:
    src = tmp_path / "s.zarr"
    precompute(npz_data, ["mlp:16-3"], src, random_teacher=True)
    run("convert", src, "--out", tmp_path / "s.zarr.zip")
    code, _, err = run("precompute", "--data", npz_data, "--teacher", "mlp:16-3", "--out",
                       tmp_path / "s.zarr.zip", "--overwrite", "--random-teacher")
    assert code == 1 and "read-only" in err


def test_report_writes_plots_and_provenance(tmp_path: Path, npz_data: str) -> None:
    src = tmp_path / "s.zarr"
    precompute(npz_data, teachers(tmp_path)[:1], src, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    run("subset", src, "--out", tmp_path / "sub.zarr", "--fraction", "0.5")
    code, out, err = run("report", tmp_path / "sub.zarr", "--out", tmp_path / "rep")
    assert code == 0, err
    for png in ("confidence_entropy.png", "class_mass.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "t0.pt" in md and "subset of" in md and "teacher top-1 accuracy" in md
    with open_transfer_set(tmp_path / "sub.zarr") as ts:
        acc = float((ts.logits().argmax(1) == ts.labels()).mean())
    assert f"{acc:.4f} on" in md


def test_self_contained_set_trains_a_student_alone(tmp_path: Path, npz_data: str) -> None:
    src = tmp_path / "s.zarr"
    code, _, err = run("precompute", "--data", npz_data, "--teacher", "mlp:16-8-3", "--out", src,
                       "--temperatures", "1,4", "--chunk-rows", CHUNK, "--store-inputs",
                       "--random-teacher")
    assert code == 0, err
    from softlabels.sources.load import load_data

    inputs, original = load_data(f"transferset:{src}"), load_data(npz_data)
    assert len(inputs) == len(original)
    for i in (0, 17, N_ROWS - 1):
        assert np.array_equal(inputs[i][0].numpy(), original[i][0].numpy())
        assert inputs[i][1] == original[i][1]
    assert verify(src, data=f"transferset:{src}").ok  # every sample hash matches
    code, out, err = run("train", "--data", f"transferset:{src}", "--model", "mlp:16-8-3",
                         "--out", tmp_path / "s.pt", "--transfer-set", src, "--epochs", 1)
    assert code == 0, err
    # a subset of a self-contained set still trains from it alone
    run("subset", src, "--out", tmp_path / "sub.zarr", "--classes", "0,1")
    code, _, err = run("train", "--data", f"transferset:{tmp_path / 'sub.zarr'}", "--model",
                       "mlp:16-8-3", "--out", tmp_path / "s2.pt", "--transfer-set",
                       tmp_path / "sub.zarr", "--epochs", 1)
    assert code == 0, err
    code, _, err = run("train", "--data", f"transferset:{tmp_path / 'none.zarr'}", "--model",
                       "mlp:16-3", "--out", tmp_path / "x.pt")
    assert code == 1 and "does not exist" in err

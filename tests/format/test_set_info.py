"""SetInfo (format/info.py): the typed descriptive metadata of a set reads every set written
today and writes it back exactly, and refuses malformed metadata in one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from token_data import TEACHER, write_tokens

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import TransferSetError
from softlabels.format.info import Member, SetInfo, SourceRecord
from softlabels.format.layout import FILE_KEYS, LAYOUT_KEYS, ROW_KINDS
from softlabels.format.operations import convert, merge, subset
from softlabels.format.reader import open_transfer_set
from softlabels.sets.vllm import import_vllm
from softlabels.sets.write_set import write_set
from softlabels.teachers.models import build_model, save_checkpoint


def carried(meta: dict[str, Any]) -> dict[str, Any]:
    """The descriptive part of a set's metadata: all but the layout's keys and the file's."""
    return {k: v for k, v in meta.items() if k not in (*LAYOUT_KEYS, *FILE_KEYS)}


def canonical(value: Any) -> str:
    """JSON as the digest sees it: an int that became a float would show."""
    return json.dumps(value, sort_keys=True)


def vllm_file(path: Path, vocab: int = 12, k: int = 3) -> Path:
    """Prompt log-probs as vLLM writes them, from random distributions."""
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for n in (4, 1, 6):
            ids = rng.integers(0, vocab, n).tolist()
            out: list[Any] = [None]
            for j in range(1, n):
                lp = torch.log_softmax(torch.from_numpy(rng.normal(size=vocab)), -1)
                keep = sorted(set(torch.topk(lp, k).indices.tolist()) | {ids[j]})
                out.append({str(i): float(lp[i]) for i in keep})
            f.write(json.dumps({"prompt_token_ids": ids, "prompt_logprobs": out}) + "\n")
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One set of each kind that precompute, import and the set operations write."""
    from conftest import make_npz

    d = tmp_path_factory.mktemp("info")
    data = make_npz(d / "d.npz")
    teachers = []
    for k, spec in enumerate(["mlp:16-8-3", "mlp:16-6-3"]):
        save_checkpoint(build_model(spec), d / f"t{k}.pt", spec=spec)
        teachers.append(str(d / f"t{k}.pt"))
    tokens = write_tokens(d / "t.jsonl")
    out = {name: d / f"{name}.zarr" for name in (
        "ensemble", "views", "topk", "single", "sequences", "arrays", "vllm", "convert",
        "subset", "merge", "subset_sequences", "subset_of_convert")}
    common = dict(temperatures=[1, 4], chunk_rows=CHUNK, random_teacher=True)
    precompute(data, teachers, out["ensemble"], keep_members=True, **common)
    precompute(data, ["mlp:16-8-3"], out["views"], views=2, augment="hflip", **common)
    precompute(data, teachers[:1], out["topk"], topk=2, **common)
    precompute(data, teachers[1:], out["single"], **common)
    precompute(tokens, [TEACHER], out["sequences"], temperatures=[1, 2], chunk_rows=16,
               random_teacher=True)
    write_set(out["arrays"], data=data, teacher_name="elsewhere",
              logits=np.random.default_rng(0).normal(size=(103, 3)).astype(np.float32))
    import_vllm(vllm_file(d / "v.jsonl"), out["vllm"], topk=3, vocab_size=12,
                teacher_name="served")
    convert(out["ensemble"], out["convert"])
    subset(out["views"], out["subset"], fraction=0.5, seed=1, exclude_classes=[2])
    merge([out["ensemble"], out["single"]], out["merge"])
    subset(out["sequences"], out["subset_sequences"], fraction=0.5)
    subset(out["convert"], out["subset_of_convert"], classes=[0, 1])
    return out


NAMES = ["ensemble", "views", "topk", "single", "sequences", "arrays", "vllm", "convert",
         "subset", "merge", "subset_sequences", "subset_of_convert"]


@pytest.mark.parametrize("name", NAMES)
def test_to_meta_writes_back_exactly_what_from_meta_read(sets: dict[str, Path],
                                                         name: str) -> None:
    with open_transfer_set(sets[name]) as ts:
        info = SetInfo.from_meta(ts.meta, where=name)
        assert info == ts.info
        assert canonical(info.to_meta()) == canonical(carried(ts.meta))
        assert info.num_examples == ts.meta["num_examples"]
        assert info.dataset.fingerprint == ts.meta["dataset"]["fingerprint"]
        assert [m.sha256 for m in info.teacher.members] == [
            m["sha256"] for m in ts.meta["teacher"]["members"]]


def test_records_are_typed(sets: dict[str, Path]) -> None:
    with open_transfer_set(sets["subset"]) as ts:
        info = ts.info
    assert isinstance(info.teacher.members[0], Member)
    assert info.augment == "hflip" and isinstance(info.view_seed, int)
    sub = info.provenance.subset_of
    assert isinstance(sub, SourceRecord) and sub.path == str(sets["views"])
    assert sub.extra["exclude_classes"] == [2] and sub.extra["fraction"] == 0.5
    with open_transfer_set(sets["merge"]) as ts:
        assert [s.path for s in ts.info.provenance.merged_from] == [
            str(sets["ensemble"]), str(sets["single"])]
        assert len(ts.info.teacher.members) == 3
    with open_transfer_set(sets["vllm"]) as ts:
        assert ts.info.teacher.targets.source == "logprobs"
        assert ts.info.provenance.imported_from.format == "vllm-prompt-logprobs"


def test_a_change_keeps_every_other_key(sets: dict[str, Path]) -> None:
    with open_transfer_set(sets["ensemble"]) as ts:
        info, meta = ts.info, carried(ts.meta)
    changed = info.derived(converted_from=SourceRecord(path="elsewhere")).to_meta()
    assert changed.pop("provenance") == {"converted_from": {"path": "elsewhere"}}
    assert canonical(changed) == canonical({k: v for k, v in meta.items()
                                            if k != "provenance"})


@pytest.mark.parametrize("key,value,named", [
    ("teacher", None, "teacher: expected"),
    ("teacher", {"members": [], "combine": "mean-logits"}, "teacher.members: expected"),
    ("teacher", {"members": [{"spec": "x", "sha256": 3}], "combine": "mean-logits"},
     "teacher.members[0].sha256: expected a string, found 3"),
    ("teacher", {"members": [{"spec": "x", "sha256": ""}], "combine": "max"},
     "teacher.combine: expected one of"),
    ("dataset", [], "dataset: expected"),
    ("dataset", {"spec": "npz:x", "length": "103", "fingerprint": "ab"},
     "dataset.length: expected"),
    ("num_examples", "103", "num_examples: expected a positive integer"),
    ("num_examples", True, "num_examples: expected a positive integer"),
    ("class_names", [1, 2], "class_names: expected a list of strings"),
    ("versions", {"torch": 2}, "versions: expected an object of strings"),
    ("provenance", {"subset_of": {"fingerprint": "ab"}}, "provenance.subset_of.path"),
])
def test_malformed_metadata_is_refused_in_one_line_naming_the_key(
        sets: dict[str, Path], key: str, value: Any, named: str) -> None:
    with open_transfer_set(sets["single"]) as ts:
        meta = {**ts.meta, key: value}
    with pytest.raises(TransferSetError) as err:
        SetInfo.from_meta(meta, where="the set")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("the set has malformed metadata (")


def test_a_complete_set_records_its_fingerprint_and_a_view_set_its_augmentation(
        sets: dict[str, Path]) -> None:
    with open_transfer_set(sets["views"]) as ts:
        meta = ts.meta
    with pytest.raises(TransferSetError, match="dataset: expected"):
        SetInfo.from_meta({**meta, "dataset": {"spec": "npz:x"}})
    SetInfo.from_meta({**meta, "dataset": {"spec": "npz:x"}, "status": "writing"})
    with pytest.raises(TransferSetError, match="augment: a view set names"):
        SetInfo.from_meta({**meta, "augment": None})


def test_one_row_strategy_per_kind() -> None:
    from softlabels.format.rows import KINDS

    assert tuple(KINDS) == ROW_KINDS


def test_report_names_where_a_set_came_from(sets: dict[str, Path], tmp_path: Path) -> None:
    from softlabels.sets.report import transfer_set_report

    transfer_set_report(sets["arrays"], tmp_path / "imported")
    md = (tmp_path / "imported" / "summary.md").read_text()
    assert "- imported (arrays)" in md and "`elsewhere` (`imported:elsewhere`)" in md
    transfer_set_report(sets["merge"], tmp_path / "merged")
    md = (tmp_path / "merged" / "summary.md").read_text()
    assert md.count("- merged from") == 2 and "## Teacher (mean-logits)" in md


def test_keys_a_newer_writer_adds_are_kept(sets: dict[str, Path]) -> None:
    with open_transfer_set(sets["single"]) as ts:
        meta = dict(ts.meta)
    meta["future"] = {"a": [1, 2]}
    meta["teacher"] = {**meta["teacher"], "future": 1.5}
    meta["dataset"] = {**meta["dataset"], "skipped": None}  # null, not absent
    info = SetInfo.from_meta(meta)
    assert info.extra == {"future": {"a": [1, 2]}} and info.teacher.extra == {"future": 1.5}
    assert canonical(info.to_meta()) == canonical(carried(meta))

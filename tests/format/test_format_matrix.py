"""Every set operation preserves every kind of set: kinds x containers x {convert, subset, merge}.

Subset and merge read their sources from the same container as they write. Each output
verifies, holds the source's rows (bit for bit for copied arrays), and a student
trains from it; an operation that cannot support a kind refuses with one line saying why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import CHUNK, make_npz
from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.operations import convert, merge, subset
from softlabels.format.reader import open_transfer_set
from softlabels.format.selection import select_rows
from softlabels.sets.verify import verify
from softlabels.train.trainer import train_student

# kind -> (teachers, precompute options)
KINDS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "dense": (["mlp:16-8-3"], {}),
    "ensemble": (["mlp:16-8-3", "mlp:16-6-3"], {"keep_members": True}),
    "mean-probs": (["mlp:16-8-3", "mlp:16-6-3"], {"keep_members": True,
                                                  "combine": "mean-probs"}),
    "topk": (["mlp:16-8-3"], {"topk": 2}),
    "sample": (["mlp:16-8-3"], {"sample_k": 4}),
    "views": (["mlp:16-8-3"], {"views": 2, "augment": "hflip"}),
    "inputs": (["mlp:16-8-3"], {"store_inputs": True}),
    "sharded": (["mlp:16-8-3"], {"shard_rows": 2 * CHUNK}),
}
CONTAINERS = ["zarr", "h5", "zarr.zip"]
COMPUTED = (S.LOGITS, S.PROBS, S.MEMBER_LOGITS)  # merge recomputes these, copies the rest


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per kind (built on first use): the source set, a second teacher's set of the same data
    and kind (to merge with), and the data."""
    root = tmp_path_factory.mktemp("matrix")
    return {"root": root, "data": make_npz(root / "data.npz"), "sets": {}}


def sources(made: dict[str, Any], kind: str) -> tuple[Path, Path]:
    if kind not in made["sets"]:
        teachers, opts = KINDS[kind]
        a, b = made["root"] / f"{kind}-a.zarr", made["root"] / f"{kind}-b.zarr"
        common = dict(temperatures=[1, 4], chunk_rows=CHUNK, batch_size=32, **opts)
        precompute(made["data"], teachers, a, **common, random_teacher=True)
        precompute(made["data"], ["mlp:16-5-3"], b, **common, random_teacher=True)
        made["sets"][kind] = (a, b)
    return made["sets"][kind]


def in_container(src: Path, container: str, tmp_path: Path) -> Path:
    """The source in `container` (copied by convert), so operations read every container."""
    if container == "zarr":
        return src
    copy = tmp_path / f"{src.name.removesuffix('.zarr')}.{container}"
    convert(src, copy)
    return copy


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    with open_transfer_set(path) as ts:
        return {n: ts.read(n) for n in ts.row_arrays()}


def check_output(out: Path, made: dict[str, Any]) -> None:
    """The output verifies and a student trains from it."""
    report = verify(out, data=made["data"])
    assert report.ok, [c for c in report.checks if not c.ok]
    result = train_student(made["data"], "mlp:16-4-3", transfer_set=out, epochs=1,
                           batch_size=64, device="cpu")
    assert result.rows > 0 and np.isfinite(result.history[-1]["loss"])


def _slow_unless_zarr(container: str) -> list[Any]:
    return [] if container == "zarr" else [pytest.mark.slow]


CASES = [pytest.param(kind, container, id=f"{kind}-{container}",
                      marks=_slow_unless_zarr(container))
         for kind in KINDS for container in CONTAINERS]


@pytest.mark.parametrize("kind,container", CASES)
def test_convert_keeps_every_array_bit_for_bit(tmp_path: Path, made: dict[str, Any],
                                               kind: str, container: str) -> None:
    src, _ = sources(made, kind)
    out = tmp_path / f"out.{container}"
    convert(src, out)
    want, got = arrays_of(src), arrays_of(out)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got[name].dtype == want[name].dtype
    with open_transfer_set(src) as a, open_transfer_set(out) as b:
        assert b.layout == a.layout  # the same kind of set, read back from its metadata
        assert {k: b.meta.get(k) for k in ("views", "augment", "view_seed", "sparse")} == \
            {k: a.meta.get(k) for k in ("views", "augment", "view_seed", "sparse")}
    check_output(out, made)


@pytest.mark.parametrize("kind,container", CASES)
def test_subset_keeps_the_selected_rows_bit_for_bit(tmp_path: Path, made: dict[str, Any],
                                                    kind: str, container: str) -> None:
    src = in_container(sources(made, kind)[0], container, tmp_path)
    out = tmp_path / f"sub.{container}"
    subset(src, out, fraction=0.4, seed=3)
    want = arrays_of(src)
    rows = select_rows(want[S.LABELS], index=want[S.INDEX], fraction=0.4, seed=3)
    got = arrays_of(out)
    assert sorted(got) == sorted(want) and len(got[S.LABELS]) == len(rows) < len(want[S.LABELS])
    for name, data in want.items():
        np.testing.assert_array_equal(got[name], np.take(data, rows, axis=S.row_axis(name)),
                                      err_msg=name)
    check_output(out, made)


MERGEABLE = ("dense", "ensemble", "mean-probs", "views", "inputs", "sharded")


@pytest.mark.parametrize("kind,container", CASES)
def test_merge_keeps_rows_and_members_or_refuses_in_one_line(
        tmp_path: Path, made: dict[str, Any], kind: str, container: str) -> None:
    a, b = (in_container(p, container, tmp_path) for p in sources(made, kind))
    out = tmp_path / f"merged.{container}"
    if kind not in MERGEABLE:
        with pytest.raises(SoftlabelsError) as err:
            merge([a, b], out)
        assert "\n" not in str(err.value) and "sparse" in str(err.value)
        assert not out.exists()
        return
    merge([a, b], out)
    first, second, got = arrays_of(a), arrays_of(b), arrays_of(out)
    assert sorted(got) == sorted(set(first) | {S.MEMBER_LOGITS})
    for name in set(first) - set(COMPUTED):  # labels, index, sample_hash, view_seed, inputs
        np.testing.assert_array_equal(got[name], first[name], err_msg=name)
    members = [first.get(S.MEMBER_LOGITS, first[S.LOGITS][None]), second[S.LOGITS][None]]
    np.testing.assert_array_equal(got[S.MEMBER_LOGITS], np.concatenate(members))
    combined = got[S.MEMBER_LOGITS].astype(np.float32).mean(0)  # merge's default mean-logits
    np.testing.assert_array_equal(got[S.LOGITS], combined.astype(got[S.LOGITS].dtype))
    with open_transfer_set(a) as x, open_transfer_set(out) as m:
        assert len(m.meta["teacher"]["members"]) == len(x.meta["teacher"]["members"]) + 1
        assert m.layout.views == x.layout.views and m.layout.shard_rows == x.layout.shard_rows
    check_output(out, made)


def test_merge_refuses_views_of_another_augmentation(tmp_path: Path,
                                                     made: dict[str, Any]) -> None:
    a, _ = sources(made, "views")
    other = tmp_path / "other.zarr"
    precompute(made["data"], ["mlp:16-5-3"], other, temperatures=[1, 4], chunk_rows=CHUNK,
               views=2, augment="hflip", view_seed=7, random_teacher=True)
    with pytest.raises(SoftlabelsError, match="view_seed") as err:
        merge([a, other], tmp_path / "m.zarr")
    assert "\n" not in str(err.value)

"""docs/FORMAT.md is enough to re-implement a reader: array checksums, the dataset fingerprint,
sample hashes and the metadata digest recomputed from the document's recipes with numpy, xxhash,
zarr and h5py alone (softlabels only makes the sets)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import xxhash
import zarr

from conftest import CHUNK, ROOT
from softlabels.compute.blocks import precompute
from softlabels.format.reader import open_transfer_set

FORMAT_MD = ROOT / "docs" / "FORMAT.md"
AXIS_1 = ("probs", "member_logits", "sample/indices")  # FORMAT.md: "Rows are sliced along ..."


def documented_keys(kind: str) -> list[str]:
    """The backticked keys of the document's sentence 'The *{kind} keys* ...'."""
    text = FORMAT_MD.read_text()
    sentence = re.search(rf"The \*{kind} keys\*(.*?)(?:\.\s|:\s*what)", text, re.S)
    assert sentence, f"FORMAT.md defines no {kind} keys"
    return re.findall(r"`([a-z_]+)`", sentence.group(1))


def read_zarr(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    g = zarr.open_group(path, mode="r")
    arrays = {name: a[...] for name, a in g.arrays()}
    for group, sub in g.groups():
        arrays |= {f"{group}/{name}": a[...] for name, a in sub.arrays()}
    return dict(g.attrs["softlabels"]), arrays


def read_h5(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: arrays.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset)
                     else None)
        return json.loads(f.attrs["softlabels"]), arrays


@pytest.mark.parametrize("kind", ["dense", "topk", "sample", "hybrid"])
def test_checksums_fingerprint_hashes_and_digest_follow_the_document(
        tmp_path: Path, npz_data: str, suffix: str, kind: str) -> None:
    path = tmp_path / f"set.{suffix}"
    opts = {"dense": {"keep_members": True}, "topk": {"topk": 2}, "sample": {"sample_k": 3},
            "hybrid": {"topk": 2, "nucleus": 0.9, "tail": 2, "quantize": 8}}
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-5-3"], path, temperatures=[1, 4, 20],
               chunk_rows=CHUNK, **opts[kind], random_teacher=True)
    meta, arrays = (read_h5 if suffix == "h5" else read_zarr)(path)

    # array_checksum: per block, one XXH3-64 per checksum slot: the row arrays in name order,
    # one slot per leading index (temperature, member) of the arrays whose rows are axis 1
    rows = meta["num_rows"]
    assert meta["format_version"] == 2
    row_arrays = sorted(n for n in arrays if n not in ("block_done", "array_checksum"))
    assert (kind == "sample") == ("sample/indices" in row_arrays)
    slots = [(n, j) for n in row_arrays
             for j in (range(arrays[n].shape[0]) if n in AXIS_1 else [None])]
    blocks = -(-rows // meta["block_rows"])
    assert arrays["array_checksum"].shape == (blocks, len(slots)) and blocks > 1
    # temperatures, members: own slots
    assert (len(slots) > len(row_arrays)) == (kind not in ("topk", "hybrid"))
    for b in range(blocks):
        start, stop = b * meta["block_rows"], min((b + 1) * meta["block_rows"], rows)
        for s, (name, j) in enumerate(slots):
            data = arrays[name][start:stop] if j is None else arrays[name][j, start:stop]
            data = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"))
            assert xxhash.xxh3_64_intdigest(data.tobytes()) == \
                int(arrays["array_checksum"][b, s]), f"block {b}, {name}[{j}]"

    # fingerprint: SHA-256 of the little-endian uint64 sample hashes in row order
    fp = hashlib.sha256(arrays["sample_hash"].astype("<u8").tobytes()).hexdigest()
    assert fp == meta["dataset"]["fingerprint"]

    # sample_hash: XXH3-64 of the input tensor's C-contiguous bytes, as the dataset returns it
    x = np.load(npz_data.removeprefix("npz:"))["x"]
    for row, i in enumerate(arrays["index"]):
        assert xxhash.xxh3_64_intdigest(np.ascontiguousarray(x[i]).tobytes()) == \
            int(arrays["sample_hash"][row])

    # top-k probabilities at a stored T: exp(topk/logits / T - topk/logsumexp[:, k])
    if kind == "topk":
        with open_transfer_set(path) as ts:
            for k, t in enumerate(meta["temperatures"]):
                p = np.exp(arrays["topk/logits"] / t - arrays["topk/logsumexp"][:, k:k + 1])
                classes, weights = ts.sparse_targets(t)
                np.testing.assert_array_equal(classes, arrays["topk/indices"])
                np.testing.assert_allclose(p, weights, rtol=1e-6)
                assert (p.sum(1) <= 1 + 1e-6).all()

    # digest: per identity key, XXH3-64 hex of the canonical JSON of its value
    keys = documented_keys("layout") + documented_keys("identity")  # "the layout keys and ..."
    assert sorted(meta["digest"]) == sorted(keys)
    for key in keys:
        text = json.dumps(meta.get(key), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True)
        assert xxhash.xxh3_64_hexdigest(text.encode()) == meta["digest"][key], key


def test_the_documented_checksum_snippet_runs(tmp_path: Path, npz_data: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python block of FORMAT.md's `array_checksum` section checks a real set."""
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-5-3"], tmp_path / "set.zarr",
               temperatures=[1, 4], chunk_rows=CHUNK, keep_members=True, random_teacher=True)
    text = FORMAT_MD.read_text()
    section = text[text.index("### `array_checksum`"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "FORMAT.md", "exec"), {})
    zarr.open_group(tmp_path / "set.zarr", mode="r+")["array_checksum"][3, 0] = 1  # can fail
    with pytest.raises(AssertionError):
        exec(compile(snippet, "FORMAT.md", "exec"), {})


@pytest.mark.parametrize("quantize", [0, 8])
def test_hybrid_arrays_follow_the_documented_recipe(tmp_path: Path, quantize: int) -> None:
    """FORMAT.md "Hybrid sets": head, tail draws, values (or codes and steps) and shifted
    log-sum-exps recomputed from the teacher's logits with torch, as the recipe says."""
    import torch
    from torch import nn

    from softlabels.sources.tokens import TokenSequences

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Embedding(30, 6), nn.Linear(6, 30))
    with torch.no_grad():
        teacher[1].weight.mul_(4)
    seqs = [list(np.random.default_rng(s).integers(0, 30, n)) for s, n in
            enumerate((9, 4, 17, 6))]
    k, p_, m, temps = 6, 0.8, 3, [2.0, 1.0]
    out = tmp_path / "h.zarr"
    precompute(TokenSequences(seqs), [teacher], out, temperatures=temps, topk=k,
               nucleus=p_, tail=m, quantize=quantize, dtype="float32",
               chunk_rows=CHUNK)
    meta, arrays = read_zarr(out)
    assert meta["sparse"] == {"kind": "hybrid", "k": k, "nucleus": p_, "tail": m,
                              "quantize": quantize or None}
    t0 = meta["temperatures"][0]
    offsets = arrays["seq/offsets"]
    for s, ids in enumerate(seqs):
        with torch.no_grad():
            z = teacher(torch.tensor(ids)[None])[0].float()  # (L, C)
        rows = slice(offsets[s], offsets[s + 1])
        idx, lse = arrays["hybrid/indices"][rows], arrays["hybrid/logsumexp"][rows]
        u = torch.rand(len(ids), m, generator=torch.Generator().manual_seed(s))
        for j in range(len(ids)):
            p0 = torch.softmax(z[j] / t0, -1)
            top = torch.topk(z[j], k)
            h = min(int((p0[top.indices].cumsum(0) < p_).sum()) + 1, k)
            head = sorted(top.indices[:h].tolist())
            assert idx[j, :k].tolist() == head + [-1] * (k - h)
            rest = p0.clone()
            rest[top.indices[:h]] = 0
            cdf = rest.cumsum(0)
            draws = torch.searchsorted(cdf, u[j] * cdf[-1], right=True)
            last = int(torch.nonzero(rest > 0).max())
            assert idx[j, k:].tolist() == sorted(draws.clamp_max(last).tolist())
            used = idx[j] >= 0
            v = (z[j] - z[j].max())[idx[j].clip(0)].numpy() * used
            if quantize:
                step = np.float32(-v.min() / 255)
                assert arrays["hybrid/scale"][rows][j] == pytest.approx(step, rel=1e-5)
                codes = arrays["hybrid/values"][rows][j].astype(np.int64)
                assert np.abs(codes - np.round(-v / step)).max() <= 1
                v_read = -codes * arrays["hybrid/scale"][rows][j]
                assert np.abs(v_read - v).max() <= step * 0.51
            else:
                np.testing.assert_allclose(arrays["hybrid/values"][rows][j], v, atol=1e-5)
            for c, t in enumerate(meta["temperatures"]):
                want = float(torch.logsumexp(z[j] / t, 0) - z[j].max() / t)
                assert lse[j, c] == pytest.approx(want, abs=1e-5)

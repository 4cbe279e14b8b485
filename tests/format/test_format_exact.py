"""docs/FORMAT.md states every recipe a reader in another language needs: each test recomputes
one documented quantity from the document's words with numpy, xxhash, zarr and torch alone and
compares it with what softlabels stored (the probe, the sampled-class draws, the sequence
log-sum-exp shift and sampler, next-token labels, hex digests, canonical JSON, chunking, the
weights hash of an hf: teacher, the recorded versions)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zarr
from torch import nn

from conftest import CHUNK
from softlabels.compute.blocks import precompute

SEQ_VOCAB, SEQ_CLASSES = 24, 16  # token ids up to 23; the teacher predicts 16 classes


class TokenTeacher(nn.Module):
    """(B, L) ids -> (B, L, 16) logits, seeded; it sees ids its classes cannot name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(SEQ_VOCAB, 8)
        self.out = nn.Linear(8, SEQ_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids)) * 3


def write_token_file(path: Path, n: int = 9) -> tuple[str, list[list[int]]]:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, SEQ_VOCAB, int(rng.integers(2, 12))).tolist() for _ in range(n)]
    path.write_text("".join(json.dumps(s) + "\n" for s in seqs))
    return f"tokens:{path}", seqs


def open_set(path: Path) -> tuple[dict[str, Any], zarr.Group]:
    g = zarr.open_group(path, mode="r")
    return dict(g.attrs["softlabels"]), g


def documented_float(x: float) -> str:
    """FORMAT.md's float rule, written from its words: the shortest round-trip decimal, always
    with a '.' or an exponent, in exponent form when the decimal exponent is < -4 or >= 16."""
    sci = np.format_float_scientific(x, unique=True, trim="-")  # e.g. '1.5e-05', '1e+16'
    exponent = int(sci.split("e")[1])
    if -4 <= exponent < 16:
        return np.format_float_positional(x, unique=True, trim="0")  # '1.0', '0.25'
    return sci


def documented_json(value: Any) -> str:
    """FORMAT.md's canonical JSON, written from its words (not with the json module)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return documented_float(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch in "\n\r\t\b\f":
                out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}[ch])
            elif code < 0x20 or code > 0x7E:
                units = [code] if code <= 0xFFFF else [0xD800 + ((code - 0x10000) >> 10),
                                                      0xDC00 + ((code - 0x10000) & 0x3FF)]
                out += [f"\\u{u:04x}" for u in units]
            else:
                out.append(ch)
        return "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ",".join(documented_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{documented_json(k)}:{documented_json(value[k])}"
                              for k in sorted(value)) + "}"
    raise TypeError(type(value))


def test_probe_hex_digests_canonical_json_chunking_and_versions(tmp_path: Path,
                                                                 npz_data: str) -> None:
    path = tmp_path / "set.zarr"
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    precompute(npz_data, [teacher], path, temperatures=[1, 2.5, 1e-4 * 3], chunk_rows=CHUNK,
               random_teacher=True)
    meta, g = open_set(path)

    # probe: the sample hashes of the examples at floor(linspace(0, N-1, min(16, N))), SHA-256
    x = np.load(npz_data.removeprefix("npz:"))["x"]
    picks = np.unique(np.floor(np.linspace(0, len(x) - 1, min(16, len(x)))).astype(np.int64))
    hashes = np.array([xxhash.xxh3_64_intdigest(np.ascontiguousarray(x[i]).tobytes())
                       for i in picks], dtype="<u8")
    assert hashlib.sha256(hashes.tobytes()).hexdigest()[:32] == meta["dataset"]["probe"]

    # digest: the 64-bit value big-endian in 16 lowercase hex digits, of the canonical JSON
    assert meta["digest"]
    for key, hexed in meta["digest"].items():
        text = documented_json(meta.get(key))
        assert text == json.dumps(meta.get(key), sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True), key
        value = xxhash.xxh3_64_intdigest(text.encode())
        assert hexed == value.to_bytes(8, "big").hex(), key

    # chunking: block_done one entry a chunk, array_checksum one block's slots a chunk
    assert g["block_done"].chunks == (1,)
    assert g["array_checksum"].chunks == (1, g["array_checksum"].shape[1])
    assert {"softlabels", "torch", "torchvision", "zarr", "h5py", "numpy",
            "python"} <= set(meta["versions"])


@pytest.mark.parametrize("value", [1.0, 0.25, 1e-05, 0.0001, 1e16, 1e15, 123456.789, -2.5e-7,
                                   0.1 + 0.2, 1 / 3, 5e-324, 1.7976931348623157e308, 0.0, 2.0])
def test_the_documented_float_rule_is_pythons_json(value: float) -> None:
    assert documented_float(value) == json.dumps(value)


@pytest.mark.parametrize("text", ["plain", "quote \" and \\ back", "tab\tnew\nline",
                                  "é ü", "emoji \U0001F600", "\x01"])
def test_the_documented_string_rule_is_pythons_json(text: str) -> None:
    assert documented_json({"k": text, "a": [1, 2.0, None, True]}) == json.dumps(
        {"k": text, "a": [1, 2.0, None, True]}, sort_keys=True, separators=(",", ":"),
        ensure_ascii=True)


def test_sampled_example_draws_follow_the_document(tmp_path: Path, npz_data: str) -> None:
    path, batch = tmp_path / "sample.zarr", 5
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    temps, k = [1.0, 4.0], 3
    precompute(npz_data, [teacher], path, temperatures=temps, sample_k=k, chunk_rows=CHUNK,
               batch_size=batch, random_teacher=True)
    meta, g = open_set(path)
    x = torch.from_numpy(np.load(npz_data.removeprefix("npz:"))["x"])
    with torch.no_grad():
        logits = teacher(x).float()
    stored = g["sample/indices"][...]
    rows = meta["num_rows"]
    for start in range(0, rows, meta["block_rows"]):  # batches cut from each block's start
        stop = min(start + meta["block_rows"], rows)
        for r0 in range(start, stop, batch):
            r1 = min(r0 + batch, stop)
            # the document's recipe: uniforms (K, n, k) of a generator seeded by the batch's
            # first row; class = the first whose float32 CDF exceeds u * total, at most C - 1
            u = torch.rand(len(temps), r1 - r0, k,
                           generator=torch.Generator().manual_seed(r0)).numpy()
            for j, t in enumerate(temps):
                cdf = np.cumsum(torch.softmax(logits[r0:r1] / t, -1).numpy(), -1,
                                dtype=np.float32)
                want = np.stack([np.searchsorted(c, uu * c[-1], side="right")
                                 for c, uu in zip(cdf, u[j])]).clip(max=2)
                np.testing.assert_array_equal(stored[j, r0:r1], np.sort(want, -1),
                                              f"rows {r0}")


def test_sequence_shift_sampler_labels_offsets_follow_the_document(tmp_path: Path) -> None:
    data, seqs = write_token_file(tmp_path / "t.jsonl")
    teacher = TokenTeacher()
    temps = [1.0, 2.0]
    top = tmp_path / "top.zarr"
    precompute(data, [teacher], top, temperatures=temps, topk=4, dtype="float32",
               chunk_rows=16, random_teacher=True)
    sampled = tmp_path / "sampled.zarr"
    precompute(data, [teacher], sampled, temperatures=temps, sample_k=5, chunk_rows=16,
               random_teacher=True)
    meta, g = open_set(top)
    offsets = g["seq/offsets"][...]
    assert g["seq/offsets"].chunks == (min(len(offsets), 131072),)
    assert meta["sequence"]["offsets_xxh3"] == xxhash.xxh3_64_intdigest(
        offsets.astype("<i8").tobytes()).to_bytes(8, "big").hex()
    smeta, sg = open_set(sampled)
    draws = sg["sample/indices"][...]
    for s, ids in enumerate(seqs):
        a, b = offsets[s], offsets[s + 1]
        with torch.no_grad():
            z = teacher(torch.tensor([ids]))[0].float()  # (L, C)
        m = z.max(-1, keepdim=True).values
        # top-k: classes ascending; logits shifted by m, log-sum-exp by m / T
        classes = g["topk/indices"][a:b]
        np.testing.assert_array_equal(classes, np.sort(torch.topk(z, 4).indices.numpy(), -1))
        np.testing.assert_allclose(g["topk/logits"][a:b],
                                   z.gather(-1, torch.from_numpy(classes).long()) - m,
                                   rtol=1e-6, atol=1e-6)
        for j, t in enumerate(temps):
            np.testing.assert_allclose(g["topk/logsumexp"][a:b, j],
                                       (torch.logsumexp(z / t, -1) - m[:, 0] / t).numpy(),
                                       rtol=1e-6, atol=1e-6)
        # next-token labels: -1 at the end and where the next id is >= C
        nxt = np.append(ids[1:], -1)
        np.testing.assert_array_equal(g["labels"][a:b], np.where(nxt >= SEQ_CLASSES, -1, nxt))
        # sampled: float32 uniforms from the sequence's generator, scaled by cdf[-1]
        u = torch.rand(len(temps), b - a, 5, generator=torch.Generator().manual_seed(s))
        for j, t in enumerate(temps):
            cdf = torch.softmax(z / t, -1).cumsum(-1)
            idx = torch.searchsorted(cdf, u[j] * cdf[..., -1:], right=True)
            want = idx.clamp_max(SEQ_CLASSES - 1).sort(-1).values
            np.testing.assert_array_equal(draws[j, a:b], want.numpy(), f"sequence {s}, T {t}")
    assert (np.asarray(g["labels"][...]) == -1).sum() > len(seqs)  # ids >= C did occur


def test_hf_teacher_hash_follows_the_document(tmp_path: Path) -> None:
    transformers = pytest.importorskip(
        "transformers", reason="hf: specs need the hf extra (transformers, safetensors)")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=SEQ_VOCAB, n_positions=32, n_embd=16, n_layer=1,
                                     n_head=2, tie_word_embeddings=True)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt")
    data, _ = write_token_file(tmp_path / "t.jsonl")
    out = tmp_path / "s.zarr"
    precompute(data, [f"hf:{tmp_path / 'gpt'}"], out, temperatures=[1.0], topk=4,
               chunk_rows=16, random_teacher=True)
    meta, _ = open_set(out)
    stored = load_file(tmp_path / "gpt" / "model.safetensors")
    assert "lm_head.weight" not in stored  # save_pretrained stores the tied weight once
    live = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt")
    h = hashlib.sha256()
    for name, t in sorted(("model." + n, t) for n, t in live.state_dict().items()):
        assert name != "model.lm_head.weight" or torch.equal(
            t, live.state_dict()["transformer.wte.weight"])
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    names = {"model." + n for n in live.state_dict()}
    assert "model.lm_head.weight" in names and "model.transformer.wte.weight" in names
    assert meta["teacher"]["members"][0]["sha256"] == h.hexdigest()

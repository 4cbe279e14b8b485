"""Sequence sets over a 128k vocabulary: bytes per token on disk, and stage-two tokens/s.

    python benchmarks/sequence_storage.py [--tokens 8192] [--vocab 131072]

1. Bytes per token (every array of the Zarr set, bookkeeping included) of top-k sets at
   k = 16, 64, 128 with three stored temperatures (1, 2, 4): top-k logits in float32 and in
   float16 (shifted by each row's largest logit), and k sampled classes per temperature.
   Goal: <= 300 bytes a token at k = 128 with exact probabilities at every stored T (DistillKit
   quotes ~300 B/token at k = 128 with an approximate normaliser). Two synthetic teachers:
   "zipf", a 16-dim embedding and head plus a Zipf unigram bias (top-k concentrates on frequent
   ids, as in a real LM whose ids follow frequency), and "flat", the same without the bias (top-k
   ids spread over the whole vocabulary: the worst case for compressing ids).
2. The largest error of the stored top-k probabilities (float16) against the teacher's dense
   softmax at each stored T.
3. Stage two from the k = 128 set: SequenceBatches read + batch tokens/s, and full training steps
   (student logits over the vocabulary, sequence_kd_loss, backward) tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softlabels.compute.blocks import precompute
from softlabels.format.reader import open_transfer_set
from softlabels.sources.tokens import TokenSequences
from softlabels.train.losses import sequence_kd_loss
from softlabels.train.padded import SequenceBatches

TEMPS = (1.0, 2.0, 4.0)


class SyntheticLM(nn.Module):
    """(B, L) ids -> (B, L, V): head(causal mean of embeddings) * scale + optional Zipf bias."""

    def __init__(self, vocab: int, zipf: bool, dim: int = 16, scale: float = 3.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.head.weight, std=scale / dim**0.5)
        ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
        self.register_buffer("bias", -1.1 * ranks.log() if zipf else torch.zeros(vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return self.head(e) + self.bias


def size_on_disk(path: Path) -> dict[str, int]:
    """Bytes per top-level array (nested ones as group/name) of a Zarr set."""
    sizes: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file():
            rel = f.relative_to(path).parts
            name = "/".join(rel[:2]) if rel[0] in ("topk", "sample", "seq") else rel[0]
            sizes[name] = sizes.get(name, 0) + f.stat().st_size
    return sizes


def tokens_data(n_tokens: int, vocab: int, length: int = 512) -> TokenSequences:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, vocab, length).tolist() for _ in range(n_tokens // length)]
    return TokenSequences(seqs)


def storage(tmp: Path, data: TokenSequences, vocab: int, ks: list[int]) -> Path:
    n = int(data.offsets[-1])
    print(f"bytes per token on disk: {n} tokens in {len(data)} sequences, V = {vocab}, "
          f"T = {list(TEMPS)}, Zarr, all arrays")
    print(f"{'teacher':8s} {'k':>4s} {'top-k f32':>10s} {'top-k f16':>10s} {'sampled':>10s}"
          f"   f16 breakdown (B/token)")
    keep = None
    for kind in ("zipf", "flat"):
        teacher = SyntheticLM(vocab, zipf=kind == "zipf")
        for k in ks:
            row = {}
            for name, kw in (("f32", dict(topk=k, dtype="float32")),
                             ("f16", dict(topk=k, dtype="float16")),
                             ("sampled", dict(sample_k=k))):
                out = tmp / f"{kind}_{k}_{name}.zarr"
                precompute(data, [teacher], out, temperatures=TEMPS, batch_size=2,
                           device="cpu", **kw, random_teacher=True)
                sizes = size_on_disk(out)
                row[name] = (sum(sizes.values()) / n, sizes)
            parts = ", ".join(f"{a} {b / n:.1f}" for a, b in sorted(row["f16"][1].items(),
                                                                     key=lambda x: -x[1])[:5])
            print(f"{kind:8s} {k:4d} {row['f32'][0]:10.1f} {row['f16'][0]:10.1f} "
                  f"{row['sampled'][0]:10.1f}   {parts}")
            if kind == "zipf" and k == max(ks):
                keep = tmp / f"{kind}_{k}_f16.zarr"
                exactness(keep, teacher, data)
    return keep


def exactness(path: Path, teacher: nn.Module, data: TokenSequences) -> None:
    with torch.no_grad():
        z = teacher(data[0][None])[0]  # (L, V) dense logits of the first sequence
    with open_transfer_set(path) as ts:
        for t in TEMPS:
            classes, weights = ts.sparse_targets(t, 0, len(z))
            dense = torch.softmax(z / t, -1).gather(1, torch.from_numpy(classes)).numpy()
            rel = np.abs(weights - dense) / dense
            print(f"    k={classes.shape[1]} float16, T={t:g}: top-k mass "
                  f"{weights.sum(1).mean():.3f}, largest relative error of a stored "
                  f"probability {rel.max():.1e} (mean {rel.mean():.1e})")


def stage_two(path: Path, vocab: int) -> None:
    t0 = time.perf_counter()
    batches = SequenceBatches(path, temperature=2.0, batch_size=2)
    load = time.perf_counter() - t0
    n = batches.num_positions
    t0 = time.perf_counter()
    for _batch in batches:
        pass
    it = time.perf_counter() - t0
    k = batches.columns["classes"].shape[1]
    print(f"stage two, k = {k}: load (checked blocks) {n / load:,.0f} tokens/s, batching "
          f"{n / it:,.0f} tokens/s")
    torch.manual_seed(0)
    student = nn.Sequential(nn.Embedding(vocab, 64), nn.Linear(64, vocab))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    steps, seen = 0, 0
    t0 = time.perf_counter()
    for batch in batches:
        loss = sequence_kd_loss(student(batch.tokens), batch, temperature=2.0, alpha=0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += int(batch.mask.sum())
        steps += 1
        if steps == 4:
            break
    dt = time.perf_counter() - t0
    print(f"stage two, training steps (embedding-64 + {vocab}-way head, batch of 2 x 512 "
          f"tokens): {seen / dt:,.0f} tokens/s over {steps} steps")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--ks", default="16,64,128", help="top-k sizes, comma-separated")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = tokens_data(args.tokens, args.vocab)
        kept = storage(Path(tmp), data, args.vocab, [int(k) for k in args.ks.split(",")])
        stage_two(kept, args.vocab)


if __name__ == "__main__":
    main()

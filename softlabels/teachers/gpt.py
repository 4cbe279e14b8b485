"""A small causal transformer over token ids: the built-in MODEL spec
`gpt:VOCAB?dim=..&layers=..&heads=..&context=..` (the tiny_lm main job's teacher and student).

Built in, not a `python:` spec, so a checkpoint of one (which names its spec) loads without
`--trust-code`: the spec names an architecture, not code to import."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softlabels.errors import SpecError

GPT_OPTIONS = ("dim", "layers", "heads", "context")


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """(B, L) byte ids -> (B, L, vocab) next-byte logits, L <= context."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.context:
            raise ValueError(f"sequence of {ids.shape[1]} tokens, context is {self.context}")
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.ln(self.blocks(x)))


def build_gpt(body: str, options: dict[str, Any], spec: str) -> TinyGPT:
    """A fresh `TinyGPT` from the spec `gpt:VOCAB?dim=..&layers=..&heads=..&context=..`."""
    sizes = {"dim": 128, "layers": 4, "heads": 4, "context": 128, **options}
    if (set(options) - set(GPT_OPTIONS) or not body.isdigit() or int(body) < 1
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in sizes.values())):
        raise SpecError(f"malformed gpt spec {spec!r}; expected e.g. gpt:256?dim=96&layers=3&"
                        f"heads=4&context=128 (positive integers; options {GPT_OPTIONS})")
    if sizes["dim"] % sizes["heads"]:
        raise SpecError(f"in {spec!r}, dim {sizes['dim']} must be a multiple of heads "
                        f"{sizes['heads']}")
    return TinyGPT(int(body), **sizes)

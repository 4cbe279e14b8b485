"""Sparse targets: bytes per token against fidelity, on real next-byte distributions.

    python benchmarks/sparse_fidelity.py [--teacher PATH] [--tokens 8192] [--epochs 1]

The teacher is the tiny_lm recipe's (pipelines/tiny_lm.toml: gpt:256?dim=96&layers=3&heads=4,
byte-level, V = 256), trained here on data/tiny_lm/train.txt (or loaded from --teacher, a
checkpoint written by an earlier run, which it also writes). It is run over the first --tokens
bytes of data/tiny_lm/held_out.txt, cut into 128-byte sequences, and every target kind is
written as a real sequence set (precompute, temperatures 1 and 2), so bytes are what the Zarr
set holds on disk, every array and bookkeeping file included. Against the teacher's dense
p_T (float64, from its float32 logits), per position and at each T:

* KL(p_T || p^) and total variation 0.5 |p_T - p^|_1, where p^ is what the set reconstructs:
  stored probabilities where a class has a stored value (dense: all; top-k: the k; hybrid:
  the head and the distinct tail classes), the rest of the mass spread evenly over the other
  classes; sampled classes have no values: p^ is their frequency (KL infinite).
* the student's gradient error: || g - g_dense || / || g_dense ||, g the gradient in the
  student logits of the soft loss the set trains with (top-k: `residual` and `zero`
  conventions; sampled and hybrid: the unbiased estimate) and g_dense the dense KD loss's,
  for two students: "random" (an untrained student of the recipe, near uniform) and "near"
  (the teacher's logits plus N(0, 1) noise).
* the gradient's bias, for the kinds that draw classes (sampled, hybrid): the same error of the
  gradient averaged over --redraws independent draws of every row (made with the codec on the
  teacher's float32 logits; top-k and dense draw nothing: their bias is their error).
Means over positions; `uptime` load printed beside the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from softlabels.compute.blocks import precompute
from softlabels.experiments.tiny_lm import write_sequences
from softlabels.format.reader import open_transfer_set
from softlabels.format.targets import TeacherOutputs
from softlabels.sources.load import load_data
from softlabels.teachers.models import load_model, save_checkpoint
from softlabels.train.losses import kd_loss_from_probs, sparse_kd_loss, target_convention
from softlabels.train.padded import SequenceBatches
from softlabels.train.trainer import train_sequence_model

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "gpt:256?dim=96&layers=3&heads=4&context=128"
STUDENT = "gpt:256?dim=48&layers=2&heads=2&context=128"
TEMPS = (1.0, 2.0)
LENGTH = 128

VARIANTS: dict[str, dict] = {
    "dense fp16": dict(dtype="float16", probs_dtype="float16"),
    "top-16 fp16": dict(topk=16, dtype="float16"),
    "top-64 fp16": dict(topk=64, dtype="float16"),
    "top-128 fp16": dict(topk=128, dtype="float16"),
    "sampled 16": dict(sample_k=16),
    "sampled 64": dict(sample_k=64),
    "hybrid K=32 P=.95 M=8": dict(topk=32, nucleus=0.95, tail=8, dtype="float16"),
    "hybrid K=48 P=.99 M=16": dict(topk=48, nucleus=0.99, tail=16, dtype="float16"),
    "hybrid K=64 P=.99 M=16": dict(topk=64, nucleus=0.99, tail=16, dtype="float16"),
    "hybrid K=64 P=.99 M=16 q8": dict(topk=64, nucleus=0.99, tail=16, quantize=8),
    "hybrid K=128 P=1 M=0 q8": dict(topk=128, nucleus=1.0, tail=0, quantize=8),
}


def teacher_model(path: Path, epochs: int, tmp: Path) -> torch.nn.Module:
    """The tiny_lm teacher: loaded from `path`, or trained on train.txt and saved there."""
    if path.exists():
        return load_model(str(path))[0].eval()
    spec = write_sequences((ROOT / "data/tiny_lm/train.txt").read_bytes(), tmp / "train.jsonl",
                           LENGTH)
    batches = SequenceBatches.from_tokens(load_data(spec), batch_size=32, num_classes=256)
    torch.manual_seed(0)
    net, built = load_model(TEACHER)
    t0 = time.perf_counter()
    train_sequence_model(net, batches, epochs=epochs, lr=3e-3, alpha=0.0, device="cpu")
    print(f"teacher {TEACHER}: {epochs} epoch(s) on train.txt in "
          f"{time.perf_counter() - t0:.0f} s")
    save_checkpoint(net, path, spec=built, meta={"epochs": epochs})
    return net.eval()


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def reconstruction(ts, t: float, rows: int, num_classes: int) -> np.ndarray:
    """(rows, C) float64 p^ as the module docstring defines it."""
    if not ts.target.sparse:
        return ts.probs(t, 0, rows).astype(np.float64)
    got = ts.sparse_targets(t, 0, rows)
    classes = got[0]
    if ts.target.name == "sample":
        return ts.densify(classes, got[1]).astype(np.float64)
    if ts.layout.hybrid:  # exact p of every stored class (padding weighs 0), each class once
        p, known = np.exp(got[2].astype(np.float64)), got[1] > 0
    else:
        p, known = got[1].astype(np.float64), np.ones(classes.shape, bool)
    out = np.zeros((rows, num_classes))
    have = np.zeros((rows, num_classes), bool)
    r = np.repeat(np.arange(rows), classes.shape[1]).reshape(classes.shape)
    out[r[known], classes[known]] = p[known]
    have[r[known], classes[known]] = True
    rest = np.clip(1 - out.sum(1, keepdims=True), 0, None)
    return np.where(have, out, rest / np.maximum((~have).sum(1, keepdims=True), 1))


def kl_tv(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(terms.sum(1).mean()), float(0.5 * np.abs(p - q).sum(1).mean())


def grad_error(ts, t: float, rows: int, student: torch.Tensor, p: torch.Tensor,
               convention: str | None) -> float:
    """Mean over rows of || g - g_dense || / || g_dense ||."""
    s = student.clone().requires_grad_(True)
    kd_loss_from_probs(s, p.float(), temperature=t).backward()
    dense = s.grad.clone()
    s.grad = None
    if ts.target.sparse:
        got = [torch.from_numpy(a) for a in ts.sparse_targets(t, 0, rows)]
        sparse_kd_loss(s, got[0], got[1], *got[2:], temperature=t,
                       convention=convention).backward()
    else:
        kd_loss_from_probs(s, torch.from_numpy(ts.probs(t, 0, rows)), temperature=t).backward()
    return float(((s.grad - dense).norm(dim=1) / dense.norm(dim=1)).mean())


def redrawn_grad_error(ts, t: float, z: torch.Tensor, student: torch.Tensor, p: torch.Tensor,
                       redraws: int) -> float:
    """|| mean_d g_d - g_dense || / || g_dense ||, mean over rows, g_d the gradient from the
    d-th independent draw of every row's sampled classes (or hybrid tail)."""
    s = student.float().clone().requires_grad_(True)
    kd_loss_from_probs(s, p.float(), temperature=t).backward()
    dense, total = s.grad.clone(), torch.zeros_like(s)
    hybrid, k = ts.layout.hybrid, ts.temperature_index(t)
    for d in range(redraws):
        g = torch.Generator().manual_seed(1000 + d)
        s.grad = None
        if hybrid is not None:
            arrays = hybrid.encode(
                TeacherOutputs(z.float(), lambda: None, lambda j: None), tuple(ts.temperatures),
                lambda leading, m, g=g: torch.rand(*leading, len(z), m, generator=g))
            got = hybrid.decode({n: a.numpy() for n, a in arrays.items()}, t, k,
                                tuple(ts.temperatures))
            sparse_kd_loss(s, *got, temperature=t, convention="estimate").backward()
        else:
            m = ts.target.to_meta()['k']
            draws = torch.multinomial(p.float(), m, replacement=True, generator=g)
            sparse_kd_loss(s, draws, torch.full(draws.shape, 1 / m), temperature=t,
                           convention="estimate").backward()
        total += s.grad
    return float(((total / redraws - dense).norm(dim=1) / dense.norm(dim=1)).mean())


def breakdown(path: Path, n: int) -> str:
    """The largest arrays' bytes per token."""
    sizes: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file():
            rel = f.relative_to(path).parts
            name = "/".join(rel[:2]) if rel[0] in ("topk", "sample", "seq", "hybrid") else rel[0]
            sizes[name] = sizes.get(name, 0) + f.stat().st_size
    top = sorted(sizes.items(), key=lambda x: -x[1])[:3]
    return ", ".join(f"{a} {b / n:.1f}" for a, b in top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "runs/sparse_fidelity/teacher.pt"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--redraws", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    path = Path(args.teacher)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        teacher = teacher_model(path, args.epochs, tmp)
        held = (ROOT / "data/tiny_lm/held_out.txt").read_bytes()[:args.tokens + 1]
        spec = write_sequences(held, tmp / "held.jsonl", LENGTH)
        data = load_data(spec)
        with torch.no_grad():
            z = torch.cat([teacher(data[s][None])[0] for s in range(len(data))]).double()
        n = len(z)
        torch.manual_seed(1)
        students = {"random": torch.cat([load_model(STUDENT)[0](data[s][None])[0].detach()
                                         for s in range(len(data))]).double(),
                    "near": z + torch.randn_like(z)}
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"teacher on {n} held-out bytes ({len(data)} sequences), V = 256, T = "
              f"{list(TEMPS)}; load: {uptime}")
        names = args.only.split(",") if args.only else list(VARIANTS)
        for name in names:
            out = tmp / f"{len(results)}.zarr"
            precompute(spec, [teacher], out, temperatures=TEMPS, batch_size=8,
                       device="cpu", **VARIANTS[name])
            row = {"variant": name, "bytes_per_token": size_on_disk(out) / n,
                   "breakdown": breakdown(out, n)}
            with open_transfer_set(out) as ts:
                kind = ts.target.name if ts.target.sparse else "dense"
                conventions = ["residual", "zero"] if kind == "topk" else [None]
                for t in TEMPS:
                    p = torch.softmax(z / t, -1)
                    kl, tv = kl_tv(p.numpy(), reconstruction(ts, t, n, 256))
                    row[f"kl@{t:g}"], row[f"tv@{t:g}"] = kl, tv
                    for conv in conventions:
                        c = target_convention(kind, conv) if ts.target.sparse else None
                        for who, s in students.items():
                            key = f"grad@{t:g} {who}" + (f" {conv}" if conv else "")
                            row[key] = grad_error(ts, t, n, s.float(), p, c)
                            if kind in ("sample", "hybrid"):
                                row[f"bias@{t:g} {who}"] = redrawn_grad_error(
                                    ts, t, z, s, p, args.redraws)
            results.append(row)
            print(json.dumps(row))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_table(results: list[dict]) -> None:
    print("\n| targets | B/token | KL T=1 | KL T=2 | TV T=1 | TV T=2 | grad err T=1 random / "
          "near | grad err T=2 random / near | grad bias T=1 / T=2 (random) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        grads = []
        for t in ("1", "2"):
            keys = [k for k in r if k.startswith(f"grad@{t} ")]
            convs = sorted({k.split()[2] for k in keys if len(k.split()) == 3})
            if convs:
                grads.append("; ".join(f"{c}: {r[f'grad@{t} random {c}']:.3f} / "
                                       f"{r[f'grad@{t} near {c}']:.3f}" for c in convs))
            else:
                grads.append(f"{r[f'grad@{t} random']:.3f} / {r[f'grad@{t} near']:.3f}")
        bias = (f"{r['bias@1 random']:.3f} / {r['bias@2 random']:.3f}" if "bias@1 random" in r
                else "= error")
        print(f"| {r['variant']} | {r['bytes_per_token']:.1f} | {r['kl@1']:.2e} | "
              f"{r['kl@2']:.2e} | {r['tv@1']:.2e} | {r['tv@2']:.2e} | {grads[0]} | {grads[1]} | "
              f"{bias} |")
    print("\nbytes per token, largest arrays:")
    for r in results:
        print(f"  {r['variant']}: {r['breakdown']}")


if __name__ == "__main__":
    main()

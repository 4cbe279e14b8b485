"""How close is `precompute` to the teacher's bare forward passes?

Runs, in one process, (a) the teacher's bare forward passes over N images and (b) `precompute`
on the same images and batch size, each also on a small N so that start-up cancels, and prints
bare/precompute of the marginal time. Target: >= 0.95.

    python benchmarks/precompute_overhead.py                      # CPU: resnet18, 64x64
    python benchmarks/precompute_overhead.py --size 224 --model resnet50 --precision bf16 \
        --n 8192 --n-small 1024 --batch-size 256 --device cuda    # GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from softlabels.compute.blocks import precompute
from softlabels.compute.fetch import collate
from softlabels.teachers.ensemble import Teacher


def bare(teacher: Teacher, data: TensorDataset, batch_size: int) -> float:
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate,
                        pin_memory=teacher.device.type == "cuda")
    t0 = time.perf_counter()
    for x, _ in loader:
        teacher.member_logits(x)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def full(spec: str, data: TensorDataset, args: argparse.Namespace, out: Path) -> float:
    t0 = time.perf_counter()
    precompute(data, [spec], out, temperatures=[1, 4, 20], batch_size=args.batch_size,
               device=args.device, precision=args.precision, overwrite=True, random_teacher=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--n-small", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    spec = f"torchvision:{args.model}?num_classes=1000"
    teacher = Teacher([spec], device=args.device, precision=args.precision)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 1000, (args.n,), generator=gen)
    sets = {n: TensorDataset(x[:n], y[:n]) for n in (args.n_small, args.n)}
    bare(teacher, sets[args.n_small], args.batch_size)  # warm-up
    times: dict[tuple[str, int], float] = {}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved; best of each, and each round's ratio
            now = {}
            for n, data in sets.items():
                for kind in ("bare", "precompute"):
                    t = (bare(teacher, data, args.batch_size) if kind == "bare"
                         else full(spec, data, args, Path(tmp) / "set.zarr"))
                    now[kind, n] = t
                    times[kind, n] = min(times.get((kind, n), float("inf")), t)
            ratios.append((now["bare", args.n] - now["bare", args.n_small])
                          / (now["precompute", args.n] - now["precompute", args.n_small]))
    marginal = {k: times[k, args.n] - times[k, args.n_small] for k in ("bare", "precompute")}
    rows = args.n - args.n_small
    print(f"device {teacher.device}, {args.model} {args.size}x{args.size}, batch "
          f"{args.batch_size}, precision {args.precision}, threads {torch.get_num_threads()}")
    for k in ("bare", "precompute"):
        print(f"{k:10s} N={args.n}: {times[k, args.n]:.2f}s  N={args.n_small}: "
              f"{times[k, args.n_small]:.2f}s  marginal {rows / marginal[k]:.1f} images/s")
    print(f"ratio bare/precompute (marginal time, best of {args.repeats}): "
          f"{marginal['bare'] / marginal['precompute']:.3f}")
    print(f"ratio per round: {' '.join(f'{r:.3f}' for r in ratios)}; median "
          f"{sorted(ratios)[len(ratios) // 2]:.3f}")


if __name__ == "__main__":
    main()

"""Stage one's own cost: `precompute` against the same teacher alone (issue 22, item 1).

A trivial teacher makes the pipeline's own cost show: a one-layer (or two-layer) MLP over an
.npz of random inputs. Each round runs, interleaved in one process,
  teacher  the same batches (contiguous slices of the inputs already in memory) through the
           teacher's forward passes alone (`Teacher.member_logits`);
  precompute  `precompute("npz:FILE", ...)` end to end, into a fresh set;
and prints rows/s of both, their ratio per round and the medians. Goal: >= 0.9.

Sequence sets (`--case seq`): an embedding-to-logits teacher over token ids, top-16 over a
32k vocabulary; "teacher" is the teacher's forward passes plus top-k and log-sum-exp on the
batches precompute forms (`compute.positions.device_targets`, what runs on the teacher's device),
"precompute" writes the set; both in positions/s, and the host side's own rate
positions / (precompute time - device time).

    python benchmarks/stage_one_writer.py --case dense100 --case dense1000 --case seq
    python benchmarks/stage_one_writer.py --case dense100 --profile prof.txt   # cProfile
    python benchmarks/stage_one_writer.py --device cuda --case resnet50   # GPU: images/s
    python benchmarks/stage_one_writer.py --case dense100 --teacher-rate 250000 --writer both

`--teacher-rate R` sizes the MLP's hidden layer so that the teacher alone runs at about R
rows/s here (a short calibration before the rounds; it prints the width, which `--hidden`
then fixes): the issue's goal is stated for a teacher at >= 250 k rows/s (C = 100) and
>= 40 k rows/s (C = 1,000), not for the fastest teacher this CPU can run. `--writer both`
runs precompute inline and with the writer thread (SOFTLABELS_WRITER_THREAD=0 and 1) in every
round, interleaved with the teacher alone. Beside the rates it prints CPU time per row (user +
system, all threads; for the writer thread also split into the main thread's and the writer's):
how much of a core each side needs, whatever else the machine runs.

`--case resnet50` (GPU): a torchvision resnet50 (1000 classes) in bf16 over 224x224 inputs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softlabels.compute import blocks
from softlabels.compute.blocks import precompute
from softlabels.compute.positions import device_targets, windows
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import Teacher

CASES = {  # name: (classes, input dims, hidden width (0: one Linear), rows, batch)
    "dense100": (100, 64, 256, 200_000, 1024),
    "dense1000": (1000, 64, 256, 50_000, 1024),
    "resnet50": (1000, 0, 0, 4096, 256),
}


def mlp(inputs: int, hidden: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if not hidden:
        return nn.Linear(inputs, classes)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class EmbedLogits(nn.Module):
    """(B, L) token ids -> (B, L, V) logits: an embedding and a linear head."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def teacher_alone(teacher: Teacher, x: torch.Tensor, batch: int) -> float:
    """Seconds for the teacher's forward passes over `x` in batches (inputs already in memory,
    on the host like precompute's; pinned on a GPU)."""
    cuda = teacher.device.type == "cuda"
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        teacher.member_logits(xb.pin_memory() if cuda else xb)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def calibrate(dims: int, classes: int, x: torch.Tensor, batch: int, target: float,
              device: str) -> tuple[int, float]:
    """(hidden width, rows/s): the width at which the MLP teacher alone runs at about `target`
    rows/s on this machine now. The cost of a row grows about linearly with the width, so
    each try scales it by measured / target (median of 3 passes over >= 0.2 s of rows)."""
    hidden, rate = 256, 0.0
    for _ in range(8):
        teacher = Teacher([mlp(dims, hidden, classes)], device=device)
        n = min(len(x), max(batch * 4, int(target * 0.2) // batch * batch))
        teacher_alone(teacher, x[:batch * 2], batch)  # warm-up
        rate = statistics.median(n / teacher_alone(teacher, x[:n], batch) for _ in range(3))
        if abs(rate / target - 1) < 0.05:
            break
        hidden = max(1, round(hidden * rate / target))
    return hidden, rate


def writer_variants(writer: str) -> list[str]:
    """SOFTLABELS_WRITER_THREAD values to run precompute under ('': the library's choice)."""
    return {"default": [""], "0": ["0"], "1": ["1"], "both": ["0", "1"]}[writer]


def with_writer(value: str, call: Callable[[], float]) -> float:
    old = os.environ.pop("SOFTLABELS_WRITER_THREAD", None)
    if value:
        os.environ["SOFTLABELS_WRITER_THREAD"] = value
    try:
        return call()
    finally:
        os.environ.pop("SOFTLABELS_WRITER_THREAD", None)
        if old is not None:
            os.environ["SOFTLABELS_WRITER_THREAD"] = old


def precompute_name(value: str) -> str:
    return {"": "precompute", "0": "precompute inline", "1": "precompute writer thread"}[value]


def dense_case(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    classes, dims, hidden, rows, batch = CASES[name]
    rows = args.rows or rows
    if args.hidden is not None:
        hidden = args.hidden
    gen = np.random.default_rng(0)
    if name == "resnet50":
        import torchvision

        torch.manual_seed(0)
        model: nn.Module = torchvision.models.resnet50(num_classes=1000)
        x = gen.integers(0, 256, (rows, 3, 224, 224), dtype=np.uint8)
        precision = "bf16"
    else:
        x = gen.standard_normal((rows, dims), dtype=np.float32)
        if args.teacher_rate:
            hidden, rate = calibrate(dims, classes, torch.from_numpy(x), batch,
                                     args.teacher_rate, args.device)
            print(f"{name}: --teacher-rate {args.teacher_rate:,.0f}: hidden width {hidden} "
                  f"runs alone at {rate:,.0f} rows/s (load {os.getloadavg()[0]:.2f})")
        model = mlp(dims, hidden, classes)
        precision = "fp32"
    data = tmp / f"{name}.npz"
    np.savez(data, x=x, y=gen.integers(0, classes, rows))
    xt = torch.from_numpy(x).float() / (255 if x.dtype == np.uint8 else 1)
    teacher = Teacher([model], device=args.device, precision=precision)
    teacher_alone(teacher, xt[:batch * 4], batch)  # warm-up
    small = rows // 4
    np.savez(tmp / f"{name}_small.npz", x=x[:small], y=np.zeros(small, np.int64))
    run = {n: (lambda d=d: _precompute(f"npz:{d}", model, tmp / f"{name}.zarr", args, batch,
                                       precision=precision, temperatures=[1, 4]))
           for n, d in ((rows, data), (small, tmp / f"{name}_small.npz"))}
    variants = writer_variants(args.writer)
    for value in variants:  # warm-up: first imports, first set, the thread's first start
        with_writer(value, run[small])
    out: dict[str, list[float]] = {"teacher": []}
    kinds = ["teacher", *variants]
    for r in range(args.rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate the order
            if kind == "teacher":
                c0 = cpu_seconds()
                out[kind].append(rows / teacher_alone(teacher, xt, batch))
                out.setdefault("cpu:teacher", []).append((cpu_seconds() - c0) / rows * 1e6)
            else:
                c0, w0 = cpu_seconds(), sum(WRITER_CPU)
                t_small = with_writer(kind, run[small])
                c1, w1 = cpu_seconds(), sum(WRITER_CPU)
                t = with_writer(kind, run[rows])
                c2, w2 = cpu_seconds(), sum(WRITER_CPU)
                name = precompute_name(kind)
                out.setdefault(name, []).append(rows / t)
                out.setdefault(name + " marginal", []).append((rows - small) / (t - t_small))
                per_row = 1e6 / (rows - small)
                out.setdefault("cpu:" + name + " marginal", []).append(
                    ((c2 - c1) - (c1 - c0)) * per_row)
                if kind == "1":
                    writer = ((w2 - w1) - (w1 - w0)) * per_row
                    out.setdefault("cpu:" + name + " marginal, main thread", []).append(
                        ((c2 - c1) - (c1 - c0)) * per_row - writer)
                    out.setdefault("cpu:" + name + " marginal, writer thread", []).append(writer)
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


WRITER_CPU: list[float] = []  # CPU seconds of each run's writer thread (SOFTLABELS_WRITER_THREAD=1)
_writer_loop = blocks._writer_loop


def _timed_writer_loop(*args: object) -> None:
    """The library's writer loop, its thread's CPU time recorded (benchmark instrumentation)."""
    t0 = time.thread_time()
    try:
        _writer_loop(*args)
    finally:
        WRITER_CPU.append(time.thread_time() - t0)


blocks._writer_loop = _timed_writer_loop


def _precompute(data: object, model: nn.Module, path: Path, args: argparse.Namespace,
                batch: int, **options: object) -> float:
    prof = cProfile.Profile() if args.profile else None
    shutil.rmtree(path, ignore_errors=True)  # removing the last run's set is not timed
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    precompute(data, [model], path, batch_size=batch, device=args.device, overwrite=True,
               **options)
    if prof:
        prof.disable()
        args.profiles.append(prof)
    return time.perf_counter() - t0


def seq_case(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    vocab, length, batch = args.vocab, 512, args.seq_batch
    n = (args.rows or 65_536) // length
    gen = np.random.default_rng(0)
    data = TokenSequences([list(gen.integers(0, vocab, length - int(gen.integers(0, 64))))
                           for _ in range(n)])
    positions = int(data.offsets[-1])
    model = EmbedLogits(vocab, 16)
    teacher = Teacher([model], device=args.device)
    probe = precompute(data, [model], tmp / "seq_probe.zarr", topk=16, batch_size=batch,
                       device=args.device, overwrite=True, temperatures=[1])
    from softlabels.format.reader import open_transfer_set

    layout = open_transfer_set(probe.path).layout
    out = {"teacher": [], "precompute": []}
    for r in range(args.rounds):
        order = ("teacher", "precompute") if r % 2 == 0 else ("precompute", "teacher")
        for kind in order:
            if kind == "teacher":
                t = _device_only(teacher, data, layout, batch)
            else:
                t = _precompute(data, model, tmp / "seq.zarr", args, batch, topk=16,
                                temperatures=[1])
            out[kind].append(positions / t)
    return out


def _device_only(teacher: Teacher, data: TokenSequences, layout: object, batch: int) -> float:
    """Seconds for the teacher and its top-k on the batches precompute forms, nothing else."""
    from softlabels.compute.positions import pad

    t0 = time.perf_counter()
    for window, _ in windows(layout, list(range(layout.num_blocks)), 1 << 16):
        start, stop = layout.block_range(window[0])[0], layout.block_range(window[-1])[1]
        first = int(np.searchsorted(data.offsets, start, "right")) - 1
        last = int(np.searchsorted(data.offsets, stop - 1, "right")) - 1
        seqs = np.arange(first, last + 1)
        seqs = seqs[np.argsort(-data.lengths[seqs], kind="stable")]
        for i in range(0, len(seqs), batch):
            b = [int(s) for s in seqs[i:i + batch]]
            z = teacher.member_logits(pad([data[s] for s in b]))
            targets = device_targets(teacher, z, data.lengths[b], layout, b)
            [t.cpu() for t in targets.values()]  # on the host, as precompute's are
    return time.perf_counter() - t0


def report(name: str, res: dict[str, list[float]], unit: str) -> None:
    """Each precompute variant's rates and its ratio to the teacher alone of the same round;
    "marginal": N - N/4 rows over the time difference (start-up cancels)."""
    print(f"{name}: teacher {' '.join(f'{v:,.0f}' for v in res['teacher'])} {unit}/s "
          f"(median {statistics.median(res['teacher']):,.0f})")
    for kind, rates in res.items():
        if kind.startswith("cpu:"):
            print(f"{name}: CPU time (all threads) of {kind[4:]}: "
                  f"{' '.join(f'{v:.2f}' for v in rates)} us/row (median "
                  f"{statistics.median(rates):.2f})")
            continue
        if kind == "teacher":
            continue
        ratios = [p / t for p, t in zip(rates, res["teacher"])]
        print(f"{name}: {kind} {' '.join(f'{v:,.0f}' for v in rates)} {unit}/s (median "
              f"{statistics.median(rates):,.0f}); ratio per round "
              f"{' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
    if name == "seq":
        host = [1 / (1 / p - 1 / t) for p, t in zip(res["precompute"], res["teacher"]) if p < t]
        if host:
            print(f"{name}: host side alone (1/(1/precompute - 1/teacher)) median "
                  f"{statistics.median(host):,.0f} {unit}/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", choices=[*CASES, "seq"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=0, help="rows (positions for seq); 0: default")
    p.add_argument("--hidden", type=int, default=None, help="hidden width; 0: one Linear")
    p.add_argument("--teacher-rate", type=float, default=0,
                   help="size the hidden width so the teacher alone runs at about this many "
                        "rows/s here (a calibration before the rounds)")
    p.add_argument("--writer", choices=["default", "0", "1", "both"], default="default",
                   help="SOFTLABELS_WRITER_THREAD for precompute: the library's choice, off, "
                        "on, or both in every round")
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--seq-batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--profile", help="write cProfile's top entries of the precompute runs here")
    args = p.parse_args()
    args.profiles = []
    if args.threads:
        torch.set_num_threads(args.threads)
    default = ""
    if hasattr(blocks, "spare_core"):  # absent in a library before issue 22.1's writer choice
        default = (" (the library's default here: on, a core is spare)" if blocks.spare_core(0)
                   else " (the library's default here: off, no core spare)")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, load "
          f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, writer thread "
          f"{os.environ.get('SOFTLABELS_WRITER_THREAD', 'default')}{default}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.case or ["dense100", "dense1000", "seq"]:
            if case == "seq":
                report(case, seq_case(args, Path(tmp)), "positions")
            else:
                report(case, dense_case(case, args, Path(tmp)),
                       "images" if case == "resnet50" else "rows")
    print(f"load after {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    if args.profiles:
        stats = io.StringIO()
        st = pstats.Stats(args.profiles[0], stream=stats)
        for prof in args.profiles[1:]:
            st.add(prof)
        st.sort_stats("tottime").print_stats(25)
        Path(args.profile).write_text(stats.getvalue())


if __name__ == "__main__":
    main()

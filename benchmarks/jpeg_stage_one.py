"""Stage one over real JPEG files: decode + preprocess, the teacher, and `precompute` end to end.

Cuts --files JPEGs (about 500x375, quality 90) from scikit-image's public-domain / CC0
photographs (data/make_images.py, data/README.md) into a temporary image folder, then measures
in interleaved rounds, each on its own --per images of that folder:

  decode   imagefolder:DIR?resize=256&crop=224&mean=..&std=.. through a DataLoader, by worker
           count (--workers), or decoded on the device (--decode-device cuda);
  teacher  a ResNet-50 (random initialisation: speed only) on preprocessed batches;
  precompute  `precompute` end to end over the same images (the teacher as an nn.Module).

It prints images/s (best of the rounds) and precompute / min(decode, teacher) per round; the
goal is >= 0.9. The files sit in the page cache (just written): disk reads are not measured.

    python benchmarks/jpeg_stage_one.py                          # CPU, 5,000 files, 512 a run
    python benchmarks/jpeg_stage_one.py --device cuda --precision bf16 --per 4096 \
        --workers 4,8,16 --decode-device cuda --batch-size 256   # GPU (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
from make_images import photo_crops  # noqa: E402

from softlabels.compute.blocks import precompute  # noqa: E402
from softlabels.compute.fetch import collate  # noqa: E402
from softlabels.sources.images import ImageFolderSource, decode_batch  # noqa: E402
from softlabels.sources.load import load_data

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def part(source: ImageFolderSource, start: int, n: int) -> ImageFolderSource:
    """Images [start, start + n) of the folder, as their own source."""
    other = copy.copy(source)
    other.samples = source.samples[start:start + n]
    other.targets = source.targets[start:start + n]
    return other


def decode_rate(data: ImageFolderSource, workers: int, batch_size: int) -> float:
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        persistent_workers=False)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return len(data) / (time.perf_counter() - t0)


def device_decode_rate(data: ImageFolderSource, device: torch.device, workers: int,
                       batch_size: int) -> float:
    """Files read in `workers`, JPEGs decoded and preprocessed on `device`."""
    encoded = data.as_encoded()
    loader = DataLoader(encoded, batch_size=batch_size, num_workers=workers,
                        collate_fn=lambda items: [x for x, _ in items])
    t0 = time.perf_counter()
    for batch in loader:
        decode_batch(batch, device, data.preprocess)
    torch.cuda.synchronize(device)
    return len(data) / (time.perf_counter() - t0)


def teacher_rate(model: torch.nn.Module, n: int, batch_size: int, device: torch.device,
                 precision: str) -> float:
    x = torch.rand(batch_size, 3, 224, 224, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                enabled=dtype is not None):
        for start in range(0, n, batch_size):
            model(x[:min(batch_size, n - start)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def precompute_time(data: ImageFolderSource, model: torch.nn.Module, out: Path,
                    args: argparse.Namespace, workers: int, decode_device: str) -> float:
    t0 = time.perf_counter()
    precompute(data, [model], out, batch_size=args.batch_size, num_workers=workers,
               device=args.device, precision=args.precision, decode_device=decode_device,
               overwrite=True)
    return time.perf_counter() - t0


def precompute_rates(data: ImageFolderSource, model: torch.nn.Module, out: Path,
                     args: argparse.Namespace, workers: int, decode_device: str,
                     ) -> tuple[float, float]:
    """(end-to-end images/s over all of `data`, marginal images/s: the same less a run over
    one batch, which cancels the fixed costs of a run: loading, probing, starting workers)."""
    small = part(data, 0, args.batch_size)
    t_small = precompute_time(small, model, out, args, workers, decode_device)
    t_all = precompute_time(data, model, out, args, workers, decode_device)
    return len(data) / t_all, (len(data) - len(small)) / max(t_all - t_small, 1e-9)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--per", type=int, default=512, help="images per decoding measurement")
    p.add_argument("--per-teacher", type=int, default=None,
                   help="images per teacher and precompute measurement (default: --per)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to decode with")
    p.add_argument("--precompute-workers", default=None,
                   help="worker counts of the precompute runs (default: the largest of --workers)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--decode-device", default="cpu", help="also decode on this device (cuda)")
    p.add_argument("--folder", default=None,
                   help="make the JPEGs here and keep them (reused when already there); "
                        "default: a temporary folder")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    pre_workers = ([int(w) for w in args.precompute_workers.split(",")]
                   if args.precompute_workers else [max(workers)])
    per_teacher = args.per_teacher or args.per
    device = torch.device(args.device)
    import torchvision

    model = torchvision.models.resnet50().eval().to(device)  # random init: speed only
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = Path(args.folder) if args.folder else Path(tmp) / "images"
        paths = sorted(folder.glob("*/*.jpg"))
        if len(paths) != args.files:
            paths = photo_crops(args.files, folder)
        size = sum(p.stat().st_size for p in paths)
        print(f"made {len(paths)} JPEGs ({size / len(paths) / 1024:.0f} KiB each on average) in "
              f"{time.perf_counter() - t0:.0f}s; load {load()}")
        source = load_data(f"imagefolder:{folder}?resize=256&crop=224&mean={MEAN}&std={STD}")
        # the folder lists class by class: take each round's images from across the classes
        source.samples = source.samples[0::5] + source.samples[1::5] + source.samples[2::5] \
            + source.samples[3::5] + source.samples[4::5]
        source.targets = [y for _, y in source.samples]
        teacher_rate(model, args.batch_size, args.batch_size, device, args.precision)  # warm-up
        best: dict[str, float] = {}
        round_ratios: dict[str, list[float]] = {}
        start = 0
        for r in range(args.rounds):
            data = part(source, start % (len(source) - args.per + 1), args.per)
            start += args.per
            now: dict[str, float] = {}
            for w in workers:
                now[f"decode w={w}"] = decode_rate(data, w, args.batch_size)
            if args.decode_device != "cpu":
                now[f"decode on {args.decode_device}"] = device_decode_rate(
                    data, torch.device(args.decode_device), min(workers[-1], 4),
                    args.batch_size)
            now["teacher"] = teacher_rate(model, per_teacher, args.batch_size, device,
                                          args.precision)
            small = part(data, 0, per_teacher)
            ratios = []
            runs = [(f"w={w}", w, "cpu") for w in pre_workers]
            if args.decode_device != "cpu":
                runs.append((f"decode on {args.decode_device}", min(workers[-1], 4),
                             args.decode_device))
            for name, w, where in runs:
                key = f"precompute {name}"
                now[key], now[key + " marginal"] = precompute_rates(
                    small, model, Path(tmp) / "set.zarr", args, w, where)
                decode = now.get(f"decode w={w}") if where == "cpu" else \
                    now[f"decode on {where}"]
                bound = min(decode or now[f"decode w={workers[-1]}"], now["teacher"])
                ratios.append(f"{name} {now[key] / bound:.3f} (marginal "
                              f"{now[key + ' marginal'] / bound:.3f})")
                round_ratios.setdefault(key, []).append(now[key] / bound)
                round_ratios.setdefault(key + " marginal", []).append(
                    now[key + " marginal"] / bound)
            print(f"round {r}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in now.items())
                  + f"; precompute / min(decode, teacher): {', '.join(ratios)}; "
                  f"load {load()}", flush=True)
            for k, v in now.items():
                best[k] = max(best.get(k, 0.0), v)
    print(f"device {device}, resnet50 224x224 {args.precision}, batch {args.batch_size}, "
          f"{args.per} images a decoding run, {per_teacher} a teacher run, threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}")
    for k, v in best.items():
        print(f"  {k:28s} {v:8.1f} images/s (best of {args.rounds})")
    for k, values in round_ratios.items():
        print(f"  {k:28s} / min(decode, teacher): median {statistics.median(values):.3f} of "
              + " ".join(f"{r:.3f}" for r in values))


if __name__ == "__main__":
    main()

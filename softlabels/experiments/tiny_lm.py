"""A second main job on real text (issue 13.4): a small byte-level language model distilled per
token from stored top-k (and sampled) targets, against the same student on hard next tokens,
and both again on 3% of the training text (the paper's speech finding, Hinton et al. 2015 §4).

The text is CPython's own standard-library source (data/tiny_lm, see data/README.md); the
tokens are its bytes (256 classes), cut into sequences of `sequence_length` bytes. Every
`validation.every`-th chunk of `validation.chunk_bytes` of the TRAINING text is set aside as a
validation split: it chooses everything that is chosen (each model is kept at the evaluated
epoch with the lowest validation perplexity; configurations are compared on it). The held-out
text (other files) chooses nothing.

The teacher and its transfer sets are made once (from `seed`); every student, and the 3%
subset, once per seed (`seed`, `seed`+1, ...; `seeds` of them), so rows of one seed are paired.
The first seed's files lie in OUT, the others' in OUT/seed{s}/.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.experiments.tiny_lm_report import PAPER, plot, results_md, summarize_lm_seeds
from softlabels.format.operations import subset
from softlabels.format.reader import open_transfer_set
from softlabels.safe_write import atomic_write, write_text
from softlabels.sources.load import load_data
from softlabels.teachers.gpt import TinyGPT
from softlabels.teachers.models import load_checkpoint, load_model, save_checkpoint
from softlabels.train.metrics import evaluate_sequence_model
from softlabels.train.padded import SequenceBatches
from softlabels.train.trainer import train_sequence_model


def gpt(vocab: int = 256, dim: int = 128, layers: int = 4, heads: int = 4,
        context: int = 128) -> TinyGPT:
    """The recipe's models; the built-in MODEL spec `gpt:VOCAB?dim=..&layers=..` names them."""
    return TinyGPT(vocab, dim, layers, heads, context)


def split_text(data: bytes, validation: dict[str, Any] | None) -> tuple[bytes, bytes]:
    """(training, validation) bytes: every `every`-th chunk of `chunk_bytes` (chunks every-1,
    2*every-1, ...) is validation; none without a `validation` table."""
    if not validation:
        return data, b""
    size, every = validation.get("chunk_bytes"), validation.get("every")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, every)) \
            or size < 1 or every < 2:
        raise SoftlabelsError("[data] validation takes whole numbers chunk_bytes >= 1 and "
                              f"every >= 2 (e.g. {{ chunk_bytes = 4096, every = 10 }}), got "
                              f"{validation!r}; fix the pipeline file")
    if len(data) < size * every:
        raise SoftlabelsError(f"the training text has {len(data)} bytes, fewer than one "
                              f"validation chunk in {every} of {size} needs ({size * every}); "
                              "lower [data] validation.chunk_bytes")
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    return (b"".join(c for i, c in enumerate(chunks) if i % every != every - 1),
            b"".join(c for i, c in enumerate(chunks) if i % every == every - 1))


def _check_sparse_sizes(setcfg: dict[str, Any]) -> None:
    """[transfer_set] topk and sample_k are whole numbers >= 1 (0 would make a dense set,
    reported as "top-0"), checked before any step runs."""
    for key in ("topk", "sample_k"):
        value = setcfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SoftlabelsError(f"[transfer_set] {key} = {value!r}: expected a whole number "
                                  "of classes of at least 1 (e.g. 16) and at most 255; this "
                                  "pipeline stores sparse targets")


def write_sequences(data: bytes, out: Path, length: int) -> str:
    """The bytes cut into sequences of `length`, one JSON list a line; a tokens: spec."""
    with atomic_write(out, "w", what="sequence file", encoding="utf-8") as f:
        for i in range(0, len(data) - 1, length):
            f.write(json.dumps(list(data[i:i + length])) + "\n")
    return f"tokens:{out}"


class _Job:
    """What every step of one run shares: the data, the evaluation sets, the step cache."""

    def __init__(self, cfg: dict[str, Any], out: Path, steps: Any,
                 callbacks: list[Any]) -> None:
        self.cfg, self.out, self.steps, self.callbacks = cfg, out, steps, callbacks
        d = cfg["data"]
        length = int(d["sequence_length"])
        train_bytes, val_bytes = split_text(Path(d["train"]).read_bytes()[:d.get("train_bytes")],
                                            d.get("validation"))
        held_bytes = Path(d["held_out"]).read_bytes()[:d.get("held_out_bytes")]
        self.train_spec = write_sequences(train_bytes, out / "train.jsonl", length)
        self.train_data = load_data(self.train_spec)
        self.evals = {"held_out": write_sequences(held_bytes, out / "held_out.jsonl", length)}
        if val_bytes:
            self.evals["validation"] = write_sequences(val_bytes, out / "validation.jsonl",
                                                       length)
        self.eval_batches = {k: SequenceBatches.from_tokens(load_data(v), batch_size=64,
                                                            shuffle=False, num_classes=256)
                             for k, v in self.evals.items()}
        self.select_on = "validation" if val_bytes else None
        self.sizes = {"train_bytes": len(train_bytes), "validation_bytes": len(val_bytes),
                      "held_out_bytes": len(held_bytes)}

    def evaluate(self, net: torch.nn.Module, name: str) -> dict[str, float]:
        r = evaluate_sequence_model(net, self.eval_batches[name], device="cpu")
        return {"perplexity": round(r["perplexity"], 4),
                "token_accuracy": round(r["token_accuracy"], 4)}

    def train(self, name: str, params: dict[str, Any], batches: SequenceBatches, key: Any,
              seed: int, **kwargs: Any) -> dict[str, Any]:
        """Train and score one model; kept at the evaluated epoch (every `eval_every`, and the
        last) with the lowest validation perplexity when there is a validation split."""
        ckpt = self.out / f"{name}.pt"

        def go() -> dict[str, Any]:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            epochs, every = int(params["epochs"]), int(params.get("eval_every", 1))
            torch.manual_seed(seed)
            net, spec = load_model(params["model"])
            curve: list[dict[str, Any]] = []
            best: dict[str, Any] = {"perplexity": math.inf, "epoch": epochs, "state": None}

            def watch(event: str, info: dict[str, Any]) -> None:
                e = info.get("epoch", 0)
                if event != "epoch" or self.select_on is None or (e % every and e != epochs):
                    return
                v = self.evaluate(net, self.select_on)
                net.train()
                curve.append({"epoch": e, "loss": round(info["loss"], 4),
                              "validation_perplexity": v["perplexity"]})
                if v["perplexity"] < best["perplexity"]:
                    best.update(perplexity=v["perplexity"], epoch=e,
                                state=copy.deepcopy(net.state_dict()))

            result = train_sequence_model(
                net, batches, epochs=epochs, lr=float(params.get("lr", 3e-3)), seed=seed,
                weight_decay=float(params.get("weight_decay", 0.0)), device="cpu",
                callbacks=[*self.callbacks, watch], **kwargs)
            last = {f"final_{k}": v for k, v in self.evaluate(net, self.select_on).items()} \
                if self.select_on else {}
            if best["state"] is not None:
                net.load_state_dict(best["state"])
            save_checkpoint(net, ckpt, spec=spec, meta={"history": result.history,
                                                        "epoch": best["epoch"], **kwargs})
            scores = {k: self.evaluate(net, k) for k in self.eval_batches}
            return {**scores.pop("held_out"), **{f"{k}_{m}": v for k, s in scores.items()
                                                 for m, v in s.items()},
                    **last, "epoch": best["epoch"], "positions": result.rows,
                    "loss": [round(h["loss"], 4) for h in result.history], "curve": curve}
        if kwargs.get("alpha") == 0.0:  # hard targets: the soft-target settings play no part
            params = {k: v for k, v in params.items() if k not in ("temperature", "alpha")}
        return self.steps.run(name, {**params, **kwargs, "data": key, "seed": seed}, go)


def tiny_lm(cfg: dict[str, Any], out: Path, steps: Any, callbacks: list[Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, n_seeds = int(cfg.get("seed", 0)), int(cfg.get("seeds", 1))
    dcfg, tcfg, setcfg = cfg["data"], cfg["teacher"], cfg["transfer_set"]
    _check_sparse_sizes(setcfg)
    job = _Job(cfg, out, steps, callbacks)

    # 1. The teacher, on hard next bytes of the training text (validation chunks left out).
    hard_all = SequenceBatches.from_tokens(job.train_data, batch_size=int(tcfg["batch_size"]),
                                           seed=first, num_classes=256)
    teacher = job.train("teacher", tcfg, hard_all, dcfg, first, alpha=0.0)

    # 2. Its targets, stored once: top-k with exact normalisers, and k sampled bytes.
    temps = [float(t) for t in setcfg["temperatures"]]
    sets = {}
    for kind in ("topk", "sample"):
        path = out / f"{kind}.zarr"
        opts = {"topk": int(setcfg["topk"])} if kind == "topk" else \
            {"sample_k": int(setcfg["sample_k"])}
        sets[kind] = path
        steps.run(f"set_{kind}", {"teacher": tcfg, "data": dcfg, "set": setcfg},
                  lambda path=path, opts=opts: str(precompute(
                      job.train_spec, [str(out / "teacher.pt")], path, temperatures=temps,
                      batch_size=64, dtype="float16", device="cpu", overwrite=True,
                      **opts).path))
    with open_transfer_set(sets["topk"]) as ts:
        bytes_per_token = round(ts.nbytes_on_disk() / ts.num_rows, 1)

    seeds = list(range(first, first + n_seeds))
    per_seed = [_students(job, sets, s, "" if s == first else f"seed{s}/") for s in seeds]
    results = {
        "teacher": teacher, **summarize_lm_seeds(per_seed),
        "bytes_per_token": bytes_per_token, "seeds_run": seeds,
        "train_positions": int(job.train_data.offsets[-1]),
        "held_out_positions": _positions(job, "held_out"),
        "validation_positions": _positions(job, "validation"),
        "subset_positions": per_seed[0]["subset_positions"], **job.sizes,
        "selected_on": job.select_on or "nothing (no validation split)",
        "paper": PAPER, "seconds_this_run": round(time.perf_counter() - t0, 1),
        "seconds_all_steps": round(steps.seconds(), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "config": cfg,
    }
    write_text(out / "results.json", json.dumps(results, indent=1), what="results")
    write_text(out / "results.md", results_md(results), what="results")
    plot(results, out)
    return results


def _positions(job: _Job, name: str) -> int:
    b = job.eval_batches.get(name)
    return 0 if b is None else b.num_positions - (len(b.offsets) - 1)


def _students(job: _Job, sets: dict[str, Path], seed: int, prefix: str) -> dict[str, Any]:
    """Every student from one seed: hard, distilled from top-k and from samples, and both on
    this seed's 3% of the training sequences."""
    cfg, dcfg = job.cfg, job.cfg["data"]
    scfg, setcfg, tcfg = cfg["student"], cfg["transfer_set"], cfg["teacher"]
    t_soft, alpha, bs = float(scfg["temperature"]), float(scfg["alpha"]), int(scfg["batch_size"])
    r: dict[str, Any] = {}
    r["student_hard"] = job.train(f"{prefix}student_hard", scfg, SequenceBatches.from_tokens(
        job.train_data, batch_size=bs, seed=seed, num_classes=256), dcfg, seed, alpha=0.0)
    for key, kind in (("student_distilled", "topk"), ("student_sampled", "sample")):
        r[key] = job.train(f"{prefix}{key}", scfg, SequenceBatches(
            sets[kind], temperature=t_soft, batch_size=bs, seed=seed), [dcfg, setcfg, tcfg],
            seed, temperature=t_soft, alpha=alpha)

    # 3% of the training sequences (a subset of the set, by sequence): hard against soft.
    sub_cfg = {**scfg, **cfg["subset"]}
    sub_path = job.out / f"{prefix}subset.zarr"
    sub_key = {"set": setcfg, "fraction": sub_cfg["fraction"], "teacher": tcfg, "data": dcfg}
    job.steps.run(f"{prefix}subset_set", {**sub_key, "seed": seed},
                  lambda: _subset(sets["topk"], sub_path, float(sub_cfg["fraction"]), seed))
    sub = SequenceBatches(sub_path, temperature=t_soft, batch_size=bs, seed=seed)
    t_sub, a_sub = float(sub_cfg["temperature"]), float(sub_cfg["alpha"])
    r["subset_hard"] = job.train(f"{prefix}subset_hard", sub_cfg, sub, [sub_key, "hard"], seed,
                                 alpha=0.0)
    r["subset_soft"] = job.train(f"{prefix}subset_soft", sub_cfg, SequenceBatches(
        sub_path, temperature=t_sub, batch_size=bs, seed=seed), sub_key, seed,
        temperature=t_sub, alpha=a_sub)
    # the paper's Table 3 gives train accuracy too: each 3% model on its own training bytes
    for key in ("subset_hard", "subset_soft"):
        net = load_checkpoint(job.out / f"{prefix}{key}.pt")[0]
        r[key]["train_token_accuracy"] = round(evaluate_sequence_model(
            net, SequenceBatches(sub_path, batch_size=64, shuffle=False),
            device="cpu")["token_accuracy"], 4)
    r["subset_positions"] = sub.num_positions
    return r


def _subset(src: Path, out: Path, fraction: float, seed: int) -> str:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    subset(src, out, fraction=fraction, seed=seed)
    return str(out)

"""A second main job on real text (issue 13.4): a small byte-level language model distilled per
token from stored top-k (and sampled) targets, against the same student on hard next tokens,
and both again on 3% of the training text (the paper's speech finding, Hinton et al. 2015 §4).

The text is CPython's own standard-library source (data/tiny_lm, see data/README.md); the
tokens are its bytes (256 classes), cut into sequences of `sequence_length` bytes.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..format.operations import subset
from ..format.reader import open_transfer_set
from ..gpt import TinyGPT
from ..precompute import precompute
from ..sequence_datasets import SequenceBatches
from ..sequence_trainer import evaluate_sequence_model, train_sequence_model
from ..specs import load_checkpoint, load_data

# Hinton, Vinyals & Dean (2015): Table 1 (frame accuracy, speech) and Table 3 (3% of the data).
PAPER = {"baseline": 58.9, "ensemble_10": 61.1, "distilled": 60.8,
         "3pct_hard": 44.5, "3pct_soft": 57.0, "3pct_hard_train": 67.3,
         "3pct_soft_train": 65.4}


def gpt(vocab: int = 256, dim: int = 128, layers: int = 4, heads: int = 4,
        context: int = 128) -> TinyGPT:
    """The recipe's models; the built-in MODEL spec `gpt:VOCAB?dim=..&layers=..` names them."""
    return TinyGPT(vocab, dim, layers, heads, context)


def write_sequences(text: Path, out: Path, length: int, limit: int | None) -> str:
    """The text's bytes cut into sequences of `length`, one JSON list a line; a tokens: spec."""
    data = text.read_bytes()[:limit]
    with out.open("w") as f:
        for i in range(0, len(data) - 1, length):
            f.write(json.dumps(list(data[i:i + length])) + "\n")
    return f"tokens:{out}"


def tiny_lm(cfg: dict[str, Any], out: Path, steps: Any, callbacks: list[Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    seed = int(cfg.get("seed", 0))
    dcfg, tcfg, scfg, setcfg = cfg["data"], cfg["teacher"], cfg["student"], cfg["transfer_set"]
    length = int(dcfg["sequence_length"])
    train_spec = write_sequences(Path(dcfg["train"]), out / "train.jsonl", length,
                                 dcfg.get("train_bytes"))
    held_spec = write_sequences(Path(dcfg["held_out"]), out / "held_out.jsonl", length,
                                dcfg.get("held_out_bytes"))
    train_data, held_data = load_data(train_spec), load_data(held_spec)
    held = SequenceBatches.from_tokens(held_data, batch_size=64, shuffle=False,
                                       num_classes=256)

    def score(ckpt: Path) -> dict[str, Any]:
        r = evaluate_sequence_model(load_checkpoint(ckpt)[0], held, device="cpu")
        return {"perplexity": round(r["perplexity"], 4),
                "token_accuracy": round(r["token_accuracy"], 4)}

    def train(name: str, params: dict[str, Any], batches: SequenceBatches, key: Any,
              **kwargs: Any) -> dict[str, Any]:
        ckpt = out / f"{name}.pt"

        def go() -> dict[str, Any]:
            result = train_sequence_model(
                params["model"], batches, epochs=int(params["epochs"]),
                lr=float(params.get("lr", 3e-3)), seed=int(params.get("seed", seed)),
                device="cpu", out=ckpt, callbacks=callbacks, **kwargs)
            return {**score(ckpt), "positions": result.positions,
                    "loss": [round(h["loss"], 4) for h in result.history]}
        return steps.run(name, {**params, **kwargs, "data": key}, go)

    # 1. The teacher, on hard next bytes of the whole training text.
    hard_all = SequenceBatches.from_tokens(train_data, batch_size=int(tcfg["batch_size"]),
                                           seed=seed, num_classes=256)
    teacher = train("teacher", tcfg, hard_all, dcfg, alpha=0.0)

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
                      train_spec, [str(out / "teacher.pt")], path, temperatures=temps,
                      batch_size=64, dtype="float16", device="cpu", overwrite=True,
                      **opts).path))
    with open_transfer_set(sets["topk"]) as ts:
        bytes_per_token = round(ts.nbytes_on_disk() / ts.num_rows, 1)

    # 3. The smaller student: hard next bytes, against distilled from top-k and from samples.
    t_soft, alpha = float(scfg["temperature"]), float(scfg["alpha"])
    bs = int(scfg["batch_size"])
    hard = train("student_hard", scfg, SequenceBatches.from_tokens(
        train_data, batch_size=bs, seed=seed, num_classes=256), dcfg, alpha=0.0)
    distilled = train("student_distilled", scfg, SequenceBatches(
        sets["topk"], temperature=t_soft, batch_size=bs, seed=seed), dcfg,
        temperature=t_soft, alpha=alpha)
    sampled = train("student_sampled", scfg, SequenceBatches(
        sets["sample"], temperature=t_soft, batch_size=bs, seed=seed), dcfg,
        temperature=t_soft, alpha=alpha)

    # 4. 3% of the training sequences (a subset of the set, by sequence): hard against soft.
    sub_cfg = {**scfg, **cfg["subset"]}
    sub_path = out / "subset.zarr"
    steps.run("subset_set", {"set": setcfg, "subset": sub_cfg, "teacher": tcfg, "data": dcfg},
              lambda: _subset(sets["topk"], sub_path, float(sub_cfg["fraction"]), seed))
    sub_hard = train("subset_hard", sub_cfg, SequenceBatches(
        sub_path, temperature=t_soft, batch_size=bs, seed=seed), [dcfg, "subset"], alpha=0.0)
    sub_soft = train("subset_soft", sub_cfg, SequenceBatches(
        sub_path, temperature=t_soft, batch_size=bs, seed=seed), [dcfg, "subset"],
        temperature=t_soft, alpha=alpha)
    with open_transfer_set(sub_path) as ts:
        sub_positions = ts.num_rows

    results = {
        "teacher": teacher, "student_hard": hard, "student_distilled": distilled,
        "student_sampled": sampled, "subset_hard": sub_hard, "subset_soft": sub_soft,
        "bytes_per_token": bytes_per_token,
        "train_positions": int(train_data.offsets[-1]),
        "held_out_positions": held.num_positions - len(held_data),
        "subset_positions": sub_positions, "paper": PAPER,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "seconds_all_steps": round(steps.seconds(), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "config": cfg,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_md(results))
    plot(results, out)
    return results


def _subset(src: Path, out: Path, fraction: float, seed: int) -> str:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    subset(src, out, fraction=fraction, seed=seed)
    return str(out)


ROWS = [("teacher", "teacher (hard next bytes, all text)", None),
        ("student_hard", "student, hard next bytes, all text", "baseline"),
        ("student_distilled", "student, distilled from top-k, all text", "distilled"),
        ("student_sampled", "student, distilled from sampled bytes, all text", None),
        ("subset_hard", "student, hard next bytes, 3% of the text", "3pct_hard"),
        ("subset_soft", "student, distilled from top-k, 3% of the text", "3pct_soft")]


def results_md(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# tiny_lm: per-token distillation on CPython's standard-library source",
        "",
        f"Byte-level (256 classes); {r['train_positions']:,} training and "
        f"{r['held_out_positions']:,} held-out next-byte positions; the 3% subset holds "
        f"{r['subset_positions']:,}. Teacher `{c['teacher']['model']}`, student "
        f"`{c['student']['model']}`; targets at T = {c['student']['temperature']} "
        f"(alpha {c['student']['alpha']}), top-{c['transfer_set']['topk']} with exact "
        f"normalisers ({r['bytes_per_token']} bytes a token on disk) or "
        f"{c['transfer_set']['sample_k']} sampled bytes. Held-out text: other files.",
        "",
        "| model | held-out perplexity | held-out token accuracy | paper (speech, frame acc.) |",
        "|---|---|---|---|",
    ]
    for key, name, paper in ROWS:
        m = r[key]
        ref = f"{r['paper'][paper]}%" if paper else ""
        lines.append(f"| {name} | {m['perplexity']:.3f} | {100 * m['token_accuracy']:.2f}% "
                     f"| {ref} |")
    lines += ["", "The paper's speech model: baseline 58.9%, 10-model ensemble 61.1%, distilled "
              "single model 60.8% (Table 1); on 3% of the data, hard targets 44.5% and soft "
              "targets 57.0% test frame accuracy (Table 3).", "",
              f"Run time: {r['seconds_all_steps']} s over all steps on {r['machine']}."]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in ROWS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in ((axes[0], "perplexity", "held-out perplexity"),
                              (axes[1], "token_accuracy", "held-out token accuracy")):
        ax.bar(range(len(keys)), [r[k][metric] for k in keys],
               color=["#555", "#c44", "#48c", "#8ac", "#c88", "#48c"])
        ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys], fontsize=8)
        ax.set_title(label)
    for k in keys:
        axes[2].plot(range(1, len(r[k]["loss"]) + 1), r[k]["loss"], label=k)
    axes[2].set_xlabel("epoch")
    axes[2].set_title("training loss (per position)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tiny_lm.png", dpi=100)
    plt.close(fig)

"""The paper's MNIST experiments (Hinton, Vinyals & Dean 2015, §3) as one pipeline recipe."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..evaluate import adjust_bias, evaluate
from ..format.selection import stratified_mask
from ..metrics import accuracy_report
from ..precompute import precompute
from ..specs import load_checkpoint, load_data
from ..teacher import resolve_device
from ..trainer import materialize, predict, train_student
from .plots import hinton_report

PAPER = {"teacher": 67, "student_hard": 146, "student_distilled": 74, "omit3_errors": 206,
         "omit3_errors_on_3": 133, "omit3_errors_adjusted": 109, "omit3_errors_on_3_adjusted": 14,
         "omit3_bias": 3.5, "speech_3pct_hard": 44.5, "speech_3pct_soft": 57.0,
         "speech_all": 58.9}


def _short(report: dict[str, Any]) -> dict[str, Any]:
    return {"errors": report["errors"], "accuracy": round(report["accuracy"], 4),
            "per_class_errors": report["per_class_errors"]}


def hinton_mnist(cfg: dict[str, Any], out: Path, steps: Any,
                 callbacks: list[Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    seed = int(cfg.get("seed", 0))
    data_cfg, tcfg, scfg = cfg["data"], cfg["teacher"], cfg["student"]
    train_ds, test_ds = load_data(data_cfg["train"]), load_data(data_cfg["test"])
    x_tr, y_tr = materialize(train_ds)
    x_te, y_te = materialize(test_ds)
    train_mem = TensorDataset(x_tr, y_tr)  # identical tensors: hashes match the transfer set
    val_mask = stratified_mask(y_tr.numpy(), float(data_cfg.get("validation_fraction", 0.1)), seed)
    fit_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    test_eval = (x_te, y_te)

    def test_report(ckpt: Path, bias: dict[int, float] | None = None) -> dict[str, Any]:
        return evaluate(test_ds, str(ckpt), bias_adjust=bias, inputs=test_eval, device="cpu")

    def train(name: str, params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        ckpt = out / f"{name}.pt"

        def go() -> dict[str, Any]:
            train_student(train_mem, params["model"], out=ckpt, epochs=params["epochs"],
                          batch_size=params.get("batch_size", 128), lr=params.get("lr", 1e-3),
                          seed=params.get("seed", seed), callbacks=callbacks, device="cpu",
                          **kwargs)
            return _short(test_report(ckpt))
        key = {k: v.tolist() if isinstance(v, np.ndarray) else str(v) for k, v in kwargs.items()}
        return steps.run(name, {**params, **key}, go)

    # 1. The teacher: an ensemble trained on hard labels, with dropout and jitter.
    members = []
    for k in range(int(tcfg["members"])):
        params = {**tcfg, "seed": seed + k}
        train(f"teacher{k}", params, indices=fit_idx, jitter_pixels=int(tcfg.get("jitter", 0)))
        members.append(str(out / f"teacher{k}.pt"))
    teacher = steps.run("teacher_ensemble", {"members": members, "cfg": tcfg},
                        lambda: _short(_ensemble_report(members, x_te, y_te)))

    # 2. The transfer set: the training images at each temperature, made once.
    ts_path = out / "transfer.zarr"
    temps = [float(t) for t in cfg["transfer_set"]["temperatures"]]
    steps.run("transfer_set", {"teachers": tcfg, "temperatures": temps, "data": data_cfg},
              lambda: str(precompute(data_cfg["train"], members, ts_path, temperatures=temps,
                                     device="cpu", overwrite=True).path))
    soft = {"transfer_set": ts_path, "alpha": float(scfg.get("alpha", 0.9))}

    # 3. The 784-800-800-10 student: hard labels against distilled at T.
    hard = train("student_hard", scfg, indices=fit_idx)
    distilled = train("student_distilled", scfg, indices=fit_idx,
                      temperature=float(scfg["temperature"]), **soft)

    # 4. A tiny student across temperatures.
    sweep_cfg = {**scfg, **cfg["temperature_sweep"]}
    sweep = [{"temperature": "hard", **train("sweep_hard", sweep_cfg, indices=fit_idx)}]
    for t in sweep_cfg["temperatures"]:
        sweep.append({"temperature": float(t), **train(f"sweep_T{t:g}", sweep_cfg,
                                                       indices=fit_idx, temperature=float(t),
                                                       **soft)})

    # 5. Digit 3 omitted from the transfer set; class 3's bias tuned on the validation split.
    o_cfg = {**scfg, **cfg["omit3"]}
    omit = train("omit3", o_cfg, indices=fit_idx, exclude_classes=[3],
                 temperature=float(o_cfg["temperature"]), **soft)
    omit3 = steps.run("omit3_bias", {"cfg": o_cfg, "val": val_idx.tolist()},
                      lambda: _tune_bias(out / "omit3.pt", x_tr[val_idx], y_tr[val_idx],
                                         o_cfg["bias_grid"], test_report))
    omit3 = {"errors": omit["errors"], "errors_on_3": omit["per_class_errors"][3], **omit3}

    # 6. 3% of the transfer set: the same student from hard labels and from soft targets.
    sub_cfg = {**scfg, **cfg["subset"]}
    sub_idx = fit_idx[stratified_mask(y_tr[fit_idx].numpy(), float(sub_cfg["fraction"]), seed)]
    subset = {"rows": int(len(sub_idx)), "fraction": float(sub_cfg["fraction"]),
              "hard": train("subset_hard", sub_cfg, indices=sub_idx),
              "soft": train("subset_soft", sub_cfg, indices=sub_idx,
                            temperature=float(sub_cfg["temperature"]), **soft)}

    results = {
        "test_examples": len(y_te), "train_examples": len(fit_idx),
        "validation_examples": len(val_idx), "teacher": {**teacher, "members": len(members)},
        "student_hard": hard, "student_distilled": distilled, "temperature_sweep": sweep,
        "omit3": omit3, "subset_3pct": subset, "paper": PAPER,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "seconds_all_steps": round(steps.seconds(), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "config": cfg,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    hinton_report(results, out, ts_path)
    return results


def _ensemble_report(members: list[str], x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    dev = resolve_device("cpu")
    logits = torch.stack([predict(load_checkpoint(m)[0], x, dev) for m in members]).mean(0)
    return accuracy_report(logits, y)


def _tune_bias(ckpt: Path, x_val: torch.Tensor, y_val: torch.Tensor, grid: list[float],
               test_report: Any) -> dict[str, Any]:
    """Pick class 3's bias by validation errors (ties: the smaller bias); apply it to test."""
    model = load_checkpoint(ckpt)[0]
    logits = predict(model, x_val, resolve_device("cpu"))
    by_bias = {float(b): accuracy_report(adjust_bias(logits, {3: float(b)}), y_val)["errors"]
               for b in grid}
    best = min(by_bias, key=lambda b: (by_bias[b], b))
    adjusted = test_report(ckpt, {3: best})
    return {"bias": best, "errors_adjusted": adjusted["errors"],
            "errors_on_3_adjusted": adjusted["per_class_errors"][3],
            "validation_errors_by_bias": by_bias}


"""The paper's MNIST experiments (Hinton, Vinyals & Dean 2015, §3) as one pipeline recipe.

Every configuration is trained once per seed (`seeds` of them, from `seed`); a seed fixes the
teacher ensemble, its transfer set and every student's initialisation and data order, so
configurations trained from one seed are paired. Held-out training digits (never the test set)
choose every tuned value: the bias of the omit-3 and 7s-and-8s students, and the epoch count of
the students trained with early stopping (the temperature sweep's small net, the subset curve).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from softlabels.compute.blocks import precompute
from softlabels.errors import SoftlabelsError
from softlabels.experiments.hinton_summary import summarize_seeds
from softlabels.experiments.plots import hinton_report
from softlabels.format.selection import stratified_mask
from softlabels.safe_write import write_text
from softlabels.sets.evaluate import adjust_bias, evaluate
from softlabels.sources.load import load_data
from softlabels.teachers.ensemble import resolve_device
from softlabels.teachers.models import load_checkpoint
from softlabels.train.metrics import accuracy_report
from softlabels.train.plans import materialize, predict
from softlabels.train.trainer import train_student

log = logging.getLogger(__name__)

PAPER = {"teacher": 67, "student_hard": 146, "student_distilled": 74, "omit3_errors": 206,
         "omit3_errors_on_3": 133, "omit3_errors_adjusted": 109, "omit3_errors_on_3_adjusted": 14,
         "omit3_bias": 3.5, "speech_3pct_hard": 44.5, "speech_3pct_soft": 57.0,
         "speech_all": 58.9, "only_7_8_error_rate": 0.473, "only_7_8_error_rate_adjusted": 0.132,
         "only_7_8_bias": -7.6}


def _short(report: dict[str, Any]) -> dict[str, Any]:
    return {"errors": report["errors"], "accuracy": round(report["accuracy"], 4),
            "per_class_errors": report["per_class_errors"]}


@dataclass
class _Run:
    """What every seed's steps share: the data, the split, the configuration, the step log."""

    cfg: dict[str, Any]
    out: Path
    steps: Any
    callbacks: list[Any]
    train_mem: TensorDataset
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    test_ds: Any
    test_eval: tuple[torch.Tensor, torch.Tensor]
    fit_idx: np.ndarray
    val_idx: np.ndarray

    def test_report(self, ckpt: Path, bias: dict[int, float] | None = None) -> dict[str, Any]:
        return evaluate(self.test_ds, str(ckpt), bias_adjust=bias, inputs=self.test_eval,
                        device="cpu")

    def val_errors(self, ckpt: Path) -> int:
        logits = predict(load_checkpoint(ckpt)[0], self.x_tr[self.val_idx], resolve_device("cpu"))
        return int(accuracy_report(logits, self.y_tr[self.val_idx])["errors"])

    def train(self, seed: int, name: str, params: dict[str, Any], *,
              early_stop: int | None = None, train_seed: int | None = None,
              **kwargs: Any) -> dict[str, Any]:
        """Train one net (step `seed{seed}/{name}`, from `train_seed`, default `seed`); its
        short test report. With
        `early_stop`, train up to that many epochs, keep the epoch count with the fewest errors
        on the held-out digits (the earliest of ties) and retrain to it: `epochs`, `val_errors`
        (of the kept model) and `val_curve` (held-out errors after each epoch) join the report."""
        ckpt = self.out / f"seed{seed}" / f"{name}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        t_seed = seed if train_seed is None else train_seed

        def fit(epochs: int, val: Any) -> Any:
            return train_student(self.train_mem, params["model"], out=ckpt, epochs=epochs,
                                 batch_size=params.get("batch_size", 128),
                                 lr=params.get("lr", 1e-3), seed=t_seed, val_data=val,
                                 callbacks=self.callbacks, device="cpu", **kwargs)

        def go() -> dict[str, Any]:
            if early_stop is None:
                fit(int(params["epochs"]), None)
                return _short(self.test_report(ckpt))
            val = TensorDataset(self.x_tr[self.val_idx], self.y_tr[self.val_idx])
            n_val = len(self.val_idx)
            history = fit(early_stop, val).history
            curve = [round((1 - h["val_accuracy"]) * n_val) for h in history]
            best = int(np.argmin(curve)) + 1  # argmin: the earliest of equal counts
            if best < early_stop:
                fit(best, None)  # same seed, same data order: the model after `best` epochs
            kept = self.val_errors(ckpt)
            if kept != curve[best - 1]:
                log.warning("%s: retrained to %d epochs, %d held-out errors where the selection"
                            " run had %d; training is not deterministic here", name, best,
                            kept, curve[best - 1])
            return {**_short(self.test_report(ckpt)), "epochs": best, "val_errors": kept,
                    "val_curve": curve}
        key = {k: v.tolist() if isinstance(v, np.ndarray) else str(v) for k, v in kwargs.items()}
        if "transfer_set" in kwargs:  # a new teacher makes a new set: retrain its students
            key["transfer_set_step"] = self.steps.done[f"seed{seed}/transfer_set"]["key"]
        what = ("model", "batch_size", "lr") + (("epochs",) if early_stop is None else ())
        return self.steps.run(f"seed{seed}/{name}",
                              {**{k: params.get(k) for k in what}, **key, "seed": t_seed,
                               "early_stop": early_stop}, go)

    def tune_bias(self, seed: int, name: str, classes: list[int],
                  grid_spec: list[float] | dict[str, float], sign: float) -> dict[str, Any]:
        """Add `sign * b` to `classes`' logits, b from the grid (a list, or {start, stop, step})
        chosen by held-out errors (ties: the smallest b); the test errors with it."""
        ckpt = self.out / f"seed{seed}" / f"{name}.pt"
        grid = _grid(grid_spec)

        def go() -> dict[str, Any]:
            logits = predict(load_checkpoint(ckpt)[0], self.x_tr[self.val_idx],
                             resolve_device("cpu"))
            y_val = self.y_tr[self.val_idx]
            by_b = {float(b): accuracy_report(adjust_bias(logits, {c: sign * b for c in classes}),
                                              y_val)["errors"] for b in grid}
            best = min(by_b, key=lambda b: (by_b[b], b))
            bias = sign * best + 0.0  # + 0.0: no "-0.0" in the JSON
            adjusted = self.test_report(ckpt, {c: bias for c in classes})
            return {"bias": bias, "errors_adjusted": adjusted["errors"],
                    "per_class_errors_adjusted": adjusted["per_class_errors"],
                    "validation_errors_by_bias": {f"{sign * b + 0.0:g}": e
                                                  for b, e in by_b.items()}}
        return self.steps.run(f"seed{seed}/{name}_bias",
                              {"grid": list(grid), "classes": classes, "sign": sign,
                               "val": self.val_idx.tolist(), "ckpt": self.steps.done.get(
                                   f"seed{seed}/{name}", {}).get("key")}, go)


def hinton_mnist(cfg: dict[str, Any], out: Path, steps: Any,
                 callbacks: list[Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    _check(cfg)
    first, n_seeds = int(cfg.get("seed", 0)), int(cfg.get("seeds", 1))
    data_cfg = cfg["data"]
    train_ds, test_ds = load_data(data_cfg["train"]), load_data(data_cfg["test"])
    x_tr, y_tr = materialize(train_ds)
    x_te, y_te = materialize(test_ds)
    # the split is the first seed's for every seed: one set of held-out digits
    val_mask = stratified_mask(y_tr.numpy(), float(data_cfg.get("validation_fraction", 0.1)),
                               first)
    run = _Run(cfg=cfg, out=out, steps=steps, callbacks=callbacks,
               train_mem=TensorDataset(x_tr, y_tr),  # identical tensors: hashes match the set
               x_tr=x_tr, y_tr=y_tr, test_ds=test_ds, test_eval=(x_te, y_te),
               fit_idx=np.flatnonzero(~val_mask), val_idx=np.flatnonzero(val_mask))
    seeds = list(range(first, first + n_seeds))
    per_seed = [_one_seed(run, s) for s in seeds]
    results = {
        "test_examples": len(y_te), "train_examples": len(run.fit_idx),
        "validation_examples": len(run.val_idx), "seeds_run": seeds,
        **summarize_seeds(per_seed, len(y_te)), "paper": PAPER,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "seconds_all_steps": round(steps.seconds(), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "config": cfg,
    }
    write_text(out / "results.json", json.dumps(results, indent=1), what="results")
    hinton_report(results, out, out / f"seed{first}" / "transfer.zarr")
    return results


def _one_seed(run: _Run, s: int) -> dict[str, Any]:
    """Every configuration trained from seed `s`: the per-seed reports summarize_seeds pools."""
    cfg, out, fit_idx = run.cfg, run.out, run.fit_idx
    data_cfg, tcfg, scfg = cfg["data"], cfg["teacher"], cfg["student"]

    # 1. The teacher: an ensemble trained on hard labels, with dropout and jitter.
    n_members = int(tcfg["members"])
    members = []
    for k in range(n_members):
        run.train(s, f"teacher{k}", tcfg, train_seed=s * n_members + k,  # distinct members
                  indices=fit_idx, jitter_pixels=int(tcfg.get("jitter", 0)))
        members.append(str(out / f"seed{s}" / f"teacher{k}.pt"))
    x_te, y_te = run.test_eval
    teacher = run.steps.run(f"seed{s}/teacher_ensemble", {"members": members, "cfg": tcfg},
                            lambda: _short(_ensemble_report(members, x_te, y_te)))

    # 2. The transfer set: the training images at each temperature, made once per teacher.
    ts_path = out / f"seed{s}" / "transfer.zarr"
    temps = [float(t) for t in cfg["transfer_set"]["temperatures"]]
    run.steps.run(f"seed{s}/transfer_set",
                  {"teachers": members, "cfg": tcfg, "temperatures": temps, "data": data_cfg},
                  lambda: str(precompute(data_cfg["train"], members, ts_path, temperatures=temps,
                                         device="cpu", overwrite=True).path))
    soft = {"transfer_set": ts_path, "alpha": float(scfg.get("alpha", 0.9))}

    # 3. The 784-800-800-10 student: hard labels against distilled at T, and at every T.
    hard = run.train(s, "student_hard", scfg, indices=fit_idx)
    t_main = float(scfg["temperature"])
    distilled = run.train(s, "student_distilled", scfg, indices=fit_idx, temperature=t_main,
                          **soft)
    student_sweep = [{"temperature": "hard", **hard}]
    for t in cfg.get("student_sweep", {}).get("temperatures", []):
        rep = distilled if float(t) == t_main else run.train(
            s, f"student_T{t:g}", scfg, indices=fit_idx, temperature=float(t), **soft)
        student_sweep.append({"temperature": float(t), **rep})

    # 4. A tiny student across temperatures, its epoch count chosen on the held-out digits.
    sw = {**scfg, **cfg["temperature_sweep"]}
    stop = int(sw["max_epochs"])
    sweep = [{"temperature": "hard",
              **run.train(s, "sweep_hard", sw, early_stop=stop, indices=fit_idx)}]
    for t in sw["temperatures"]:
        sweep.append({"temperature": float(t),
                      **run.train(s, f"sweep_T{t:g}", sw, early_stop=stop, indices=fit_idx,
                                  temperature=float(t), **soft)})

    # 5. Digit 3 omitted from the transfer set; class 3's bias raised, tuned on held-out digits.
    o_cfg = {**scfg, **cfg["omit3"]}
    omit = run.train(s, "omit3", o_cfg, indices=fit_idx, exclude_classes=[3],
                     temperature=float(o_cfg["temperature"]), **soft)
    tuned = run.tune_bias(s, "omit3", [3], o_cfg["bias_grid"], 1.0)
    omit3 = {"errors": omit["errors"], "errors_on_3": omit["per_class_errors"][3],
             "bias": tuned["bias"], "errors_adjusted": tuned["errors_adjusted"],
             "errors_on_3_adjusted": tuned["per_class_errors_adjusted"][3],
             "validation_errors_by_bias": tuned["validation_errors_by_bias"]}

    # 6. Only the 7s and 8s in the transfer set; their biases lowered, tuned on held-out digits.
    e_cfg = {**scfg, **cfg["only_7_8"]}
    only = run.train(s, "only_7_8", e_cfg, indices=fit_idx, classes=[7, 8],
                     temperature=float(e_cfg["temperature"]), **soft)
    tuned = run.tune_bias(s, "only_7_8", [7, 8], e_cfg["bias_grid"], -1.0)
    n_test = len(y_te)
    only_7_8 = {"error_rate": round(only["errors"] / n_test, 4), "bias": tuned["bias"],
                "error_rate_adjusted": round(tuned["errors_adjusted"] / n_test, 4),
                "errors": only["errors"], "errors_adjusted": tuned["errors_adjusted"],
                "validation_errors_by_bias": tuned["validation_errors_by_bias"]}

    # 7. The subset curve: the same student from a fraction of the rows, hard against soft,
    #    each trained with early stopping on the held-out digits (as the paper's speech model).
    sub = {**scfg, **cfg["subset"]}
    curve, y_fit = [], run.y_tr[fit_idx].numpy()
    for f in sub["fractions"]:
        f = float(f)
        rows = fit_idx if f >= 1 else fit_idx[stratified_mask(y_fit, f, s)]
        stop = min(int(sub["max_epochs"]), math.ceil(int(scfg["epochs"]) / f))
        tag = f"subset_{f:g}"
        curve.append({"fraction": f, "rows": int(len(rows)),
                      "hard": run.train(s, f"{tag}_hard", sub, early_stop=stop, indices=rows),
                      "soft": run.train(s, f"{tag}_soft", sub, early_stop=stop, indices=rows,
                                        temperature=float(sub["temperature"]), **soft)})
    return {"seed": s, "teacher": {**teacher, "members": n_members}, "student_hard": hard,
            "student_distilled": distilled, "student_sweep": student_sweep,
            "temperature_sweep": sweep, "omit3": omit3, "only_7_8": only_7_8,
            "subset_curve": curve}


def _check(cfg: dict[str, Any]) -> None:
    """Refuse, before any training, the values the recipe cannot run with."""
    def bad(where: str, expected: str, got: Any) -> SoftlabelsError:
        return SoftlabelsError(f"pipeline value {where} must be {expected}, got {got!r}; fix it "
                               f"in the file or with --set {where}=...")
    seeds = cfg.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise bad("seeds", "a whole number >= 1", seeds)
    for table, key in (("teacher", "epochs"), ("student", "epochs"),
                       ("temperature_sweep", "max_epochs"), ("subset", "max_epochs")):
        m = cfg[table].get(key)
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise bad(f"{table}.{key}", "a whole number >= 1", m)
    fractions = cfg["subset"].get("fractions")
    if not isinstance(fractions, list) or not fractions or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1
            for f in fractions):
        raise bad("subset.fractions", "a non-empty list of fractions in (0, 1]", fractions)
    for table in ("omit3", "only_7_8"):
        grid = cfg[table].get("bias_grid")
        ok = (isinstance(grid, list) and grid and all(isinstance(b, (int, float)) for b in grid)) \
            or (isinstance(grid, dict) and set(grid) == {"start", "stop", "step"}
                and all(isinstance(v, (int, float)) for v in grid.values())
                and grid["step"] > 0 and grid["stop"] >= grid["start"])
        if not ok:
            raise bad(f"{table}.bias_grid", "a list of numbers or {start, stop, step} with "
                      "step > 0", grid)


def _grid(spec: list[float] | dict[str, float]) -> list[float]:
    """A bias grid: a list as is, or {start, stop, step} with both ends included."""
    if isinstance(spec, dict):
        start, stop, step = (float(spec[k]) for k in ("start", "stop", "step"))
        return [round(v, 6) for v in np.arange(start, stop + step / 2, step).tolist()]
    return [float(b) for b in spec]


def _ensemble_report(members: list[str], x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    dev = resolve_device("cpu")
    logits = torch.stack([predict(load_checkpoint(m)[0], x, dev) for m in members]).mean(0)
    return accuracy_report(logits, y)

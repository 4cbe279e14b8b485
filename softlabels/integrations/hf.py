"""A sequence set (or its export) in a Hugging Face `Trainer` run.

    from softlabels.integrations.hf import DistillationCollator, DistillationTrainer, records

    train = records("set.zarr", temperature=1.0)      # or datasets.load_from_disk("export")
    trainer = DistillationTrainer(model=student, args=TrainingArguments(...),
                                  train_dataset=train, data_collator=DistillationCollator(),
                                  temperature=1.0, alpha=0.9)
    trainer.train()

Records carry the export's columns (softlabels/sets/export.py): `input_ids`, `labels` (Hugging
Face causal-LM labels), `target_token_ids`, `target_logprobs`, `target_mask` ([L, K]). The loss
is softlabels' sparse KD per distilled position (`losses.sparse_kd_loss`, as
`sequence_kd_loss` applies it to a set): with w = exp(target_logprobs) on the valid entries and
the residual r = 1 - sum w as one more bucket,

    alpha * T^2 * mean_p [ sum_j w_j log(w_j / q_j) + r log(r / (1 - sum_j q_j)) ]
      + (1 - alpha) * mean_l CE(labels[l + 1], softmax(s_l))

p over the positions whose target_mask is set, l over those of them that have a next token,
q = softmax(s / T) of the student's logits s at that position. Without the residual bucket
(and T^2), the soft term is Axolotl's top-k forward KL; a sampled set's export has r = 0 and
gives softlabels' unbiased sampled loss.
`transformers` is imported only when `DistillationTrainer` is first used.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from softlabels.errors import OptionError
from softlabels.format.reader import open_transfer_set
from softlabels.tempering import tempered_log_softmax
from softlabels.train.losses import labelled_cross_entropy, sparse_kd_loss

TARGETS = ("target_token_ids", "target_logprobs", "target_mask")


class SetRecords(Dataset):
    """A sequence set's sequences as export records (numpy arrays), held in memory; for sets
    larger than memory, export them and load the export with `datasets.load_from_disk`."""

    def __init__(self, path: str | os.PathLike[str], *, temperature: float = 1.0,
                 topk: int | None = None) -> None:
        from softlabels.sets.export import export_batches

        self.temperature = float(temperature)  # the T of target_logprobs
        self.items: list[dict[str, np.ndarray]] = []
        with open_transfer_set(path) as ts:
            for rec in export_batches(ts, temperature, topk):
                off, cols = rec["offsets"], rec["columns"]
                for a, b in zip(off[:-1], off[1:]):
                    self.items.append({name: cols[name][a:b] for name in
                                       ("input_ids", "labels", *TARGETS)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.items[i]


def records(path: str | os.PathLike[str], *, temperature: float = 1.0,
            topk: int | None = None) -> SetRecords:
    """The records of the sequence set at `path` at a stored `temperature` (`topk`: the K
    kept of a dense set); refuses a T the set cannot serve exactly, as `export` does."""
    return SetRecords(path, temperature=temperature, topk=topk)


class DistillationCollator:
    """Right-pads records into a batch: input_ids with `pad_token_id`, attention_mask,
    labels with -100, target_* ([B, L, K]; K the largest in the batch) with id 0, log-prob 0
    and mask 0."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{k: np.asarray(f[k]) for k in ("input_ids", "labels", *TARGETS)}
                for f in features]
        b, n = len(rows), max(len(r["input_ids"]) for r in rows)
        k = max(r["target_token_ids"].shape[-1] if r["target_token_ids"].size else 1
                for r in rows)
        out = {"input_ids": torch.full((b, n), self.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros((b, n), dtype=torch.long),
               "labels": torch.full((b, n), -100, dtype=torch.long),
               "target_token_ids": torch.zeros((b, n, k), dtype=torch.long),
               "target_logprobs": torch.zeros((b, n, k), dtype=torch.float32),
               "target_mask": torch.zeros((b, n, k), dtype=torch.long)}
        for i, r in enumerate(rows):
            m = len(r["input_ids"])
            out["input_ids"][i, :m] = torch.as_tensor(r["input_ids"].astype(np.int64))
            out["attention_mask"][i, :m] = 1
            out["labels"][i, :m] = torch.as_tensor(r["labels"].astype(np.int64))
            for name in TARGETS:
                a = r[name].reshape(m, -1)
                out[name][i, :m, :a.shape[1]] = torch.as_tensor(a.astype(
                    np.float32 if name == "target_logprobs" else np.int64))
        out["target_logprobs"] = torch.where(out["target_mask"].bool(),
                                             out["target_logprobs"], 0.0)  # no -inf padding
        return out


def distillation_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], *,
                      temperature: float = 1.0, alpha: float = 0.9) -> torch.Tensor:
    """The module docstring's loss from (B, L, V) student logits and a collated batch."""
    valid = batch["target_mask"].bool()  # (B, L, K)
    m = valid.any(-1)  # (B, L) the distilled positions
    z = logits[m]  # (N, V)
    if not len(z):  # nothing distilled in this batch: no loss, not NaN
        return logits.sum() * 0
    nxt = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)[m]  # hard target of position p
    labels = torch.where(nxt >= 0, nxt, -1)
    ids, lp, ok = batch["target_token_ids"][m], batch["target_logprobs"][m], valid[m]
    if ok.any() and int(ids[ok].max()) >= z.shape[-1]:
        raise OptionError(f"the targets name token id {int(ids[ok].max())} but the student "
                          f"has {z.shape[-1]} outputs; distil a student over the teacher's "
                          "vocabulary (at least as many outputs as the teacher's)")
    w = torch.where(ok, lp.float().exp(), 0.0)
    if alpha == 0:
        return labelled_cross_entropy(z, labels)
    if bool(ok.all()):  # every entry a class: softlabels' own sparse loss
        soft = sparse_kd_loss(z, ids, w, temperature=temperature, alpha=1.0)
        return alpha * soft + (1 - alpha) * labelled_cross_entropy(z, labels)
    # padded entries (a sampled set's export): the same formula over the valid entries
    log_q = tempered_log_softmax(z, temperature).gather(1, ids)
    r = (1 - w.sum(-1)).clamp_min(0)
    q_rest = (1 - torch.where(ok, log_q.exp(), 0.0).sum(-1)).clamp_min(1e-12)
    soft = (torch.xlogy(w, w) - torch.where(ok, w * log_q, 0.0)).sum(-1) \
        + torch.xlogy(r, r) - r * q_rest.log()
    soft = temperature**2 * soft.mean()
    return alpha * soft + (1 - alpha) * labelled_cross_entropy(z, labels)


def records_temperature(dataset: Any) -> float | None:
    """The T at which `dataset`'s target_logprobs were taken: `records(..., temperature=T)`'s,
    or that in an export's `datasets` description; None when it does not say."""
    if isinstance(dataset, SetRecords):
        return dataset.temperature
    description = getattr(getattr(dataset, "info", None), "description", None)
    try:
        info = json.loads(description) if isinstance(description, str) else None
    except ValueError:
        return None
    if isinstance(info, dict) and info.get("format") == "softlabels-export":
        t = info.get("temperature")
        return float(t) if isinstance(t, (int, float)) else None
    return None


def check_temperature_matches(datasets: Any, temperature: float) -> None:
    """Refuse records taken at another T than the loss's: the loss compares the student's
    softmax at `temperature` with the teacher's at the records' T."""
    for dataset in datasets:
        if isinstance(dataset, dict):  # the Trainer's named eval datasets
            check_temperature_matches(dataset.values(), temperature)
            continue
        t = records_temperature(dataset)
        if t is not None and abs(t - temperature) > 1e-6 * max(t, temperature):
            raise OptionError(f"the records hold the teacher's log-probs at T = {t:g} but the "
                              f"trainer's temperature is {temperature:g}; read them at that T "
                              f"(records(path, temperature={temperature:g}) or export "
                              f"--temperature {temperature:g}, a T the set stores), or pass "
                              f"temperature={t:g}")


def _trainer_class() -> type:
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """`transformers.Trainer` whose loss is `distillation_loss` at `temperature`, `alpha`
        on batches from `DistillationCollator` (records or an export)."""

        def __init__(self, *args: Any, temperature: float = 1.0, alpha: float = 0.9,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            check_temperature_matches((self.train_dataset, self.eval_dataset), temperature)
            self.kd_temperature, self.kd_alpha = temperature, alpha
            # the loss is a mean per batch: let the Trainer average it over accumulation steps
            self.model_accepts_loss_kwargs = False

        def _set_signature_columns_if_needed(self) -> None:  # keep the target columns
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(dict.fromkeys(
                [*(self._signature_columns or []), "labels", *TARGETS]))

        def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor],
                         return_outputs: bool = False, num_items_in_batch: Any = None,
                         ) -> Any:
            inputs = dict(inputs)
            targets = {k: inputs.pop(k) for k in ("labels", *TARGETS)}
            outputs = model(input_ids=inputs["input_ids"],
                            attention_mask=inputs.get("attention_mask"))
            loss = distillation_loss(outputs.logits, targets, temperature=self.kd_temperature,
                                     alpha=self.kd_alpha)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def __getattr__(name: str) -> Any:
    if name == "DistillationTrainer":  # transformers is imported on first use only
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

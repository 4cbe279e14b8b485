"""softlabels.integrations.hf: a sequence set (or its export) in a Hugging Face Trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from token_data import TEACHER, VOCAB, write_tokens

from softlabels.compute.blocks import precompute
from softlabels.sets.export import export_set
from softlabels.train.losses import sequence_kd_loss
from softlabels.train.padded import SequenceBatches

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hf")
    spec = write_tokens(d / "t.jsonl", masks=True) + "?field=input_ids&mask=loss_mask"
    precompute(spec, [TEACHER], d / "k.zarr", chunk_rows=16, topk=4, temperatures=[1, 2])
    precompute(spec, [TEACHER], d / "s.zarr", chunk_rows=16, sample_k=6, temperatures=[2])
    return {"topk": d / "k.zarr", "sample": d / "s.zarr"}


@pytest.mark.slow
def test_core_does_not_import_transformers() -> None:
    import subprocess

    code = ("import sys, softlabels, softlabels.integrations.hf; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind, t", [("topk", 2.0), ("sample", 2.0)])
def test_collated_loss_is_softlabels_loss(sets: dict[str, Path], kind: str, t: float) -> None:
    from softlabels.integrations.hf import DistillationCollator, distillation_loss, records

    recs = records(sets[kind], temperature=t)
    (batch,) = list(SequenceBatches(sets[kind], temperature=t, batch_size=len(recs),
                                    shuffle=False))
    collated = DistillationCollator()([recs[int(s)] for s in batch.sequences])
    assert torch.equal(collated["input_ids"], batch.tokens)
    logits = torch.randn(*batch.tokens.shape, VOCAB, generator=torch.Generator().manual_seed(1))
    for alpha in (1.0, 0.7):
        torch.testing.assert_close(
            distillation_loss(logits, collated, temperature=t, alpha=alpha),
            sequence_kd_loss(logits, batch, temperature=t, alpha=alpha), rtol=1e-5, atol=1e-6)


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["set", "export"])
def test_trainer_runs_a_few_steps(sets: dict[str, Path], tmp_path: Path, source: str) -> None:
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    from softlabels.integrations.hf import DistillationCollator, DistillationTrainer, records

    if source == "set":
        train = records(sets["topk"], temperature=2.0)
    else:
        export_set(sets["topk"], tmp_path / "x", to="hf", temperature=2.0)
        train = datasets.load_from_disk(str(tmp_path / "x"))
    model = _student()
    before = [p.detach().clone() for p in model.parameters()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=train,
                                  data_collator=DistillationCollator(), temperature=2.0,
                                  alpha=0.9)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and np.isfinite(losses).all() and np.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

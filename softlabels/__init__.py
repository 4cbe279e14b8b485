"""softlabels: offline knowledge distillation (Hinton, Vinyals & Dean, 2015).

Run a teacher once, store its soft targets in a transfer set, train many students from them.

The names below are imported when first used (PEP 562), so `import softlabels.cli` or
`python -m softlabels --help` does not load torch before a command needs it, and the command
line can turn a Ctrl-C during start-up into one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from softlabels._version import __version__

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "precompute_on_cluster": "softlabels.compute.cluster",
    "precompute": "softlabels.compute.blocks",
    "PrecomputeResult": "softlabels.compute.record",
    **{name: "softlabels.errors" for name in (
        "DataError", "IncompleteTransferSetError", "IntegrityError", "MismatchError",
        "OptionError", "SoftlabelsError", "SpecError", "TeacherOutputError", "TrainingError",
        "TransferSetError", "UntrustedCodeError", "WriterBusyError")},
    **{name: "softlabels.format" for name in (
        "SetInfo", "TransferSet", "convert", "merge", "open_transfer_set", "subset")},
    "PrecomputeOptions": "softlabels.options",
    "TrainOptions": "softlabels.options",
    "evaluate": "softlabels.sets.evaluate",
    "VerifyReport": "softlabels.sets.verify",
    "verify": "softlabels.sets.verify",
    "write_set": "softlabels.sets.write_set",
    "load_data": "softlabels.sources.load",
    **{name: "softlabels.teachers.models" for name in (
        "build_model", "load_checkpoint", "load_model", "save_checkpoint")},
    **{name: "softlabels.train.datasets" for name in (
        "SoftTargetBatches", "SoftTargetDataset", "StreamingSoftTargetDataset")},
    **{name: "softlabels.train.losses" for name in (
        "kd_loss", "kd_loss_from_probs", "logit_matching_loss", "sequence_kd_loss",
        "sparse_kd_loss")},
    "SequenceBatches": "softlabels.train.padded",
    "StreamingSequenceBatches": "softlabels.train.padded",
    "TrainResult": "softlabels.train.record",
    "train_student": "softlabels.train.trainer",
}

__all__ = [
    "DataError",
    "IncompleteTransferSetError",
    "IntegrityError",
    "MismatchError",
    "OptionError",
    "PrecomputeOptions",
    "PrecomputeResult",
    "SequenceBatches",
    "SetInfo",
    "SoftTargetBatches",
    "SoftTargetDataset",
    "SoftlabelsError",
    "SpecError",
    "StreamingSequenceBatches",
    "StreamingSoftTargetDataset",
    "TeacherOutputError",
    "TrainOptions",
    "TrainResult",
    "TrainingError",
    "TransferSet",
    "TransferSetError",
    "UntrustedCodeError",
    "WriterBusyError",
    "VerifyReport",
    "__version__",
    "build_model",
    "convert",
    "evaluate",
    "kd_loss",
    "kd_loss_from_probs",
    "load_checkpoint",
    "load_data",
    "load_model",
    "logit_matching_loss",
    "merge",
    "open_transfer_set",
    "precompute",
    "precompute_on_cluster",
    "save_checkpoint",
    "sequence_kd_loss",
    "sparse_kd_loss",
    "subset",
    "train_student",
    "verify",
    "write_set",
]  # each name but __version__ is imported from _EXPORTS[name] on first use


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softlabels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from softlabels.compute.blocks import precompute
    from softlabels.compute.cluster import precompute_on_cluster
    from softlabels.compute.record import PrecomputeResult
    from softlabels.errors import (
        DataError,
        IncompleteTransferSetError,
        IntegrityError,
        MismatchError,
        OptionError,
        SoftlabelsError,
        SpecError,
        TeacherOutputError,
        TrainingError,
        TransferSetError,
        UntrustedCodeError,
        WriterBusyError,
    )
    from softlabels.format import SetInfo, TransferSet, convert, merge, open_transfer_set, subset
    from softlabels.options import PrecomputeOptions, TrainOptions
    from softlabels.sets.evaluate import evaluate
    from softlabels.sets.verify import VerifyReport, verify
    from softlabels.sets.write_set import write_set
    from softlabels.sources.load import load_data
    from softlabels.teachers.models import build_model, load_checkpoint, load_model, save_checkpoint
    from softlabels.train.datasets import (
        SoftTargetBatches,
        SoftTargetDataset,
        StreamingSoftTargetDataset,
    )
    from softlabels.train.losses import (
        kd_loss,
        kd_loss_from_probs,
        logit_matching_loss,
        sequence_kd_loss,
        sparse_kd_loss,
    )
    from softlabels.train.padded import SequenceBatches, StreamingSequenceBatches
    from softlabels.train.record import TrainResult
    from softlabels.train.trainer import train_student

"""softlabels: offline knowledge distillation (Hinton, Vinyals & Dean, 2015).

Run a teacher once, store its soft targets in a transfer set, train many students from them.
"""

from __future__ import annotations

from softlabels._version import __version__
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
from softlabels.format import TransferSet, convert, merge, open_transfer_set, subset
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
from softlabels.train.losses import kd_loss, kd_loss_from_probs, logit_matching_loss, sparse_kd_loss
from softlabels.train.record import TrainResult
from softlabels.train.trainer import train_student

__all__ = [
    "DataError",
    "IncompleteTransferSetError",
    "IntegrityError",
    "MismatchError",
    "OptionError",
    "PrecomputeOptions",
    "PrecomputeResult",
    "SoftTargetBatches",
    "SoftTargetDataset",
    "SoftlabelsError",
    "SpecError",
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
    "sparse_kd_loss",
    "subset",
    "train_student",
    "verify",
    "write_set",
]

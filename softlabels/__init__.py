"""softlabels: offline knowledge distillation (Hinton, Vinyals & Dean, 2015).

Run a teacher once, store its soft targets in a transfer set, train many students from them.
"""

from __future__ import annotations

from ._version import __version__
from .cluster import precompute_on_cluster
from .datasets import SoftTargetBatches, SoftTargetDataset, StreamingSoftTargetDataset
from .errors import (
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
from .evaluate import evaluate
from .format import TransferSet, convert, merge, open_transfer_set, subset
from .losses import kd_loss, kd_loss_from_probs, logit_matching_loss, sparse_kd_loss
from .options import PrecomputeOptions, TrainOptions
from .precompute import precompute
from .run_record import PrecomputeResult
from .specs import build_model, load_checkpoint, load_data, load_model, save_checkpoint
from .train_record import TrainResult
from .trainer import train_student
from .verify import VerifyReport, verify
from .write_set import write_set

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

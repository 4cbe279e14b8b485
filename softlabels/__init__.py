"""softlabels: offline knowledge distillation (Hinton, Vinyals & Dean, 2015).

Run a teacher once, store its soft targets in a transfer set, train many students from them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    DataError,
    IncompleteTransferSetError,
    MismatchError,
    SoftlabelsError,
    SpecError,
    TeacherOutputError,
    TransferSetError,
)
from .precompute import PrecomputeResult, precompute
from .specs import build_model, load_checkpoint, load_data, load_model, save_checkpoint
from .transfer_set import TransferSet, open_transfer_set
from .verify import VerifyReport, verify

__all__ = [
    "DataError",
    "IncompleteTransferSetError",
    "MismatchError",
    "PrecomputeResult",
    "SoftlabelsError",
    "SpecError",
    "TeacherOutputError",
    "TransferSet",
    "TransferSetError",
    "VerifyReport",
    "__version__",
    "build_model",
    "load_checkpoint",
    "load_data",
    "load_model",
    "open_transfer_set",
    "precompute",
    "save_checkpoint",
    "verify",
]

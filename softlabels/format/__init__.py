"""The transfer-set format: layout, storage backends, writer, reader, set operations and the
integrity checks a set can answer by itself. It never imports the stages above it."""

from __future__ import annotations

from .integrity import VerifyReport
from .layout import Layout
from .operations import convert, merge, subset
from .reader import TransferSet, open_transfer_set
from .writer import TransferSetWriter

__all__ = ["Layout", "TransferSet", "TransferSetWriter", "VerifyReport", "convert", "merge",
           "open_transfer_set", "subset"]

"""The transfer-set format: layout, storage backends, writer, reader, set operations and the
integrity checks a set can answer by itself. It never imports the stages above it."""

from __future__ import annotations

from softlabels.format.info import SetInfo
from softlabels.format.integrity import VerifyReport
from softlabels.format.layout import Layout
from softlabels.format.operations import convert, merge, subset
from softlabels.format.reader import TransferSet, open_transfer_set
from softlabels.format.writer import TransferSetWriter

__all__ = ["Layout", "SetInfo", "TransferSet", "TransferSetWriter", "VerifyReport", "convert",
           "merge", "open_transfer_set", "subset"]

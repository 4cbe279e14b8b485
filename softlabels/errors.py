"""One error hierarchy. Every message says what was expected, what was found, and what to do."""

from __future__ import annotations

__all__ = [
    "SoftlabelsError",
    "SpecError",
    "DataError",
    "TransferSetError",
    "IncompleteTransferSetError",
    "IntegrityError",
    "MismatchError",
    "TeacherOutputError",
    "OptionError",
    "UntrustedCodeError",
    "TrainingError",
    "WriterBusyError",
    "UnsafePathError",
]


class SoftlabelsError(Exception):
    """Base class: a problem with the user's input or files, reported in one line."""


class SpecError(SoftlabelsError, ValueError):
    """A DATA or MODEL spec that is unknown or malformed."""


class DataError(SoftlabelsError):
    """A dataset that is missing, unreadable, or not of the expected form."""


class TransferSetError(SoftlabelsError):
    """Something that is not a readable transfer set of a known format."""


class IncompleteTransferSetError(TransferSetError):
    """A transfer set whose writing did not finish."""


class IntegrityError(TransferSetError):
    """A block of a transfer set that is damaged: unreadable, not matching its checksum, or
    holding values no writer stores (NaN/inf targets, labels out of range)."""


class MismatchError(SoftlabelsError):
    """Two things that must agree do not (teacher, dataset, rows, classes)."""


class TeacherOutputError(SoftlabelsError):
    """The teacher produced NaN or inf."""


class OptionError(SoftlabelsError, ValueError):
    """An option value out of its range or not among its choices (checked once, at the edge)."""


class UntrustedCodeError(SpecError):
    """A `python:` spec read from a file (checkpoint, transfer set, pipeline file) without the
    user's opt-in (`--trust-code`, `trust_code=True`)."""


class TrainingError(SoftlabelsError):
    """Training diverged (a non-finite loss or weights); nothing was saved."""
class WriterBusyError(SoftlabelsError):
    """Another process holds the writer lease on an output: one writer at a time."""


class UnsafePathError(SoftlabelsError):
    """An output path softlabels will not write: a symbolic link (at the file, its temporary
    or a folder the cache writes), something not a regular file, or a folder not its own."""

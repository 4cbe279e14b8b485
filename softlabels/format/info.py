"""What a transfer set describes beside its arrays, typed: the teacher, the dataset, the views,
where the set came from, its class names and the versions that made it.

`Layout` (layout.py) holds the metadata that says which arrays a set stores; `SetInfo` holds the
rest of the root attribute `softlabels` (docs/FORMAT.md, "The root attribute"), all but the keys
that describe one file (`FILE_KEYS`). Both map metadata one way and back:
`SetInfo.from_meta(meta, where=...)` checks every type it reads and refuses malformed metadata in
one line naming the key; `to_meta()` writes back exactly what was read (key for key, an int
stays an int), so a set operation that changes one field copies every other byte for byte.

Every record keeps the keys it does not model in `extra` (a newer writer's fields survive a
copy) and remembers in `nulls` which of its optional keys were recorded as JSON null rather
than left out. The dict fields (`preprocess`, `tokenizer`, ...) are owned by the modules that
write them (preprocessing.py, sources/); they are carried here as read.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from softlabels.errors import TransferSetError
from softlabels.format import schema as S
from softlabels.format.layout import FILE_KEYS, LAYOUT_KEYS

R = TypeVar("R", bound="_Record")
Parser = Callable[[Any, str], Any]


class _Malformed(ValueError):
    """A metadata value of the wrong form: `key` (a dotted path) and what was expected."""

    def __init__(self, key: str, expected: str, found: Any) -> None:
        super().__init__(f"{key}: expected {expected}, found {_short(found)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- value parsers: check the form, keep the value as read ----------------------------------

def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _Malformed(key, "a string", value)
    return value


def _int(value: Any, key: str, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _Malformed(key, "a positive integer" if least else "an integer >= 0", value)
    return value


def _positive(value: Any, key: str) -> int:
    return _int(value, key, 1)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Malformed(key, "true or false", value)
    return value


def _object(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(key, "an object", value)
    return copy.deepcopy(value)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Malformed(key, "a list of strings", value)
    return tuple(value)


def _numbers(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _Malformed(key, "a list of numbers", value)
    return tuple(value)


def _string_map(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Malformed(key, "an object of strings", value)
    return dict(value)


def _record(cls: type[R]) -> Parser:
    return lambda value, key: cls.parse(value, key)


def _records(cls: type[R], *, least: int = 0) -> Parser:
    def parse(value: Any, key: str) -> tuple[R, ...]:
        if not isinstance(value, list) or len(value) < least:
            raise _Malformed(key, f"a list of {cls.EXPECTED}" + (" (at least one)" if least
                                                                   else ""), value)
        return tuple(cls.parse(v, f"{key}[{i}]") for i, v in enumerate(value))
    return parse


def _choice(choices: tuple[str, ...]) -> Parser:
    def parse(value: Any, key: str) -> str:
        if value not in choices:
            raise _Malformed(key, f"one of {choices}", value)
        return value
    return parse


def _emit(value: Any) -> Any:
    """A field's value as JSON-able metadata."""
    if isinstance(value, _Record):
        return value.to_meta()
    if isinstance(value, tuple):
        return [_emit(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True)
class _Record:
    """One JSON object of the metadata. Subclasses declare their fields (None: absent), the
    parser of each (`PARSE`), those that must be there (`REQUIRED`) and what the object looks
    like (`EXPECTED`, for messages)."""

    # keys this record does not model, kept as read; optional keys recorded as null
    extra: dict[str, Any] = field(default_factory=dict, repr=False, kw_only=True)
    nulls: frozenset[str] = field(default=frozenset(), repr=False, kw_only=True)

    PARSE: ClassVar[dict[str, Parser]] = {}
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    EXPECTED: ClassVar[str] = "an object"
    SKIP: ClassVar[tuple[str, ...]] = ()  # keys that belong to another description

    @classmethod
    def parse(cls: type[R], meta: Any, key: str) -> R:
        if not isinstance(meta, dict):
            raise _Malformed(key, cls.EXPECTED, meta)
        values: dict[str, Any] = {}
        nulls = set()
        for name, parse in cls.PARSE.items():
            where = f"{key}.{name}" if key else name
            if meta.get(name) is None:
                if name in cls.REQUIRED:
                    parse(None, where)  # every parser refuses null, saying what is expected
                if name in meta:
                    nulls.add(name)
                continue
            values[name] = parse(meta[name], where)
        extra = {k: copy.deepcopy(v) for k, v in meta.items()
                 if k not in cls.PARSE and k not in cls.SKIP}
        return cls(**values, extra=extra, nulls=frozenset(nulls))

    def to_meta(self) -> dict[str, Any]:
        """The object as stored: every field set, the nulls recorded, the extra keys."""
        out: dict[str, Any] = {}
        for name in self.PARSE:
            value = getattr(self, name)
            if value is not None:
                out[name] = _emit(value)
            elif name in self.nulls:
                out[name] = None
        return {**out, **copy.deepcopy(self.extra)}


# --- the records ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightsFile(_Record):
    """One file a teacher member was loaded from: its name and the SHA-256 of its bytes."""

    file: str | None = None
    sha256: str | None = None

    PARSE: ClassVar[dict[str, Parser]] = {"file": _str, "sha256": _str}
    EXPECTED: ClassVar[str] = '{"file", "sha256"}'


@dataclass(frozen=True)
class Member(_Record):
    """One teacher of the ensemble: its model spec, what the user named (`source`), the
    SHA-256 of its state dict (what resume and `verify` compare) and of its weights files, the
    preprocessing it was trained with (`Preprocess.to_meta()`, or None)."""

    spec: str
    sha256: str
    source: str | None = None
    weights_sha256: tuple[WeightsFile, ...] | None = None
    preprocess: dict[str, Any] | None = None
    weights_entry: str | None = None
    untrained: bool | None = None

    PARSE: ClassVar[dict[str, Parser]] = {
        "spec": _str, "sha256": _str, "source": _str, "weights_sha256": _records(WeightsFile),
        "preprocess": _object, "weights_entry": _str, "untrained": _bool}
    REQUIRED: ClassVar[tuple[str, ...]] = ("spec", "sha256")
    EXPECTED: ClassVar[str] = '{"spec", "sha256", ...}'

    @property
    def name(self) -> str:
        """What the user named: the checkpoint path or spec given, else the spec."""
        return self.source or self.spec


@dataclass(frozen=True)
class Targets(_Record):
    """An imported set's account of its targets: made from `logits` or `logprobs`, exact at
    `exact_temperatures` (None: at every T)."""

    source: str | None = None
    exact_temperatures: tuple[float, ...] | None = None

    PARSE: ClassVar[dict[str, Parser]] = {"source": _str, "exact_temperatures": _numbers}
    EXPECTED: ClassVar[str] = '{"source", "exact_temperatures"?}'


@dataclass(frozen=True)
class TeacherInfo(_Record):
    """The teacher: its members, how they are combined, the preprocessing the inputs went
    through on their way to it (`preprocess`, absent when none), and an imported set's
    `targets`."""

    members: tuple[Member, ...]
    combine: str
    preprocess: dict[str, Any] | None = None
    targets: Targets | None = None

    PARSE: ClassVar[dict[str, Parser]] = {
        "members": _records(Member, least=1), "combine": _choice(S.COMBINE_CHOICES),
        "preprocess": _object, "targets": _record(Targets)}
    REQUIRED: ClassVar[tuple[str, ...]] = ("members", "combine")
    EXPECTED: ClassVar[str] = '{"members": [{"spec", "sha256", ...}, ...], "combine"}'

    @property
    def weights(self) -> list[str]:
        """Each member's state-dict SHA-256, in order."""
        return [m.sha256 for m in self.members]


@dataclass(frozen=True)
class Skipped(_Record):
    """An example `precompute --skip-bad-images` left out: its index, file and reason."""

    index: int | None = None
    name: str | None = None
    reason: str | None = None

    PARSE: ClassVar[dict[str, Parser]] = {"index": _int, "name": _str, "reason": _str}
    EXPECTED: ClassVar[str] = '{"index", "name", "reason"}'


@dataclass(frozen=True)
class DatasetInfo(_Record):
    """The data the rows were made from: its spec and length, a cheap `probe` of it (what a
    resume compares), the `fingerprint` over every row's sample hash (once complete), the
    examples skipped; a `text:` source's tokenizer, documents, chat and windows (their records
    are the sources' own, carried as read)."""

    spec: str | None = None
    length: int | None = None
    probe: str | None = None
    fingerprint: str | None = None
    skipped: tuple[Skipped, ...] | None = None
    tokenizer: dict[str, Any] | None = None
    documents: int | None = None
    chat: dict[str, Any] | None = None
    empty_documents: int | None = None
    windows: dict[str, Any] | None = None

    PARSE: ClassVar[dict[str, Parser]] = {
        "spec": _str, "length": _int, "probe": _str, "fingerprint": _str,
        "skipped": _records(Skipped), "tokenizer": _object, "documents": _int, "chat": _object,
        "empty_documents": _int, "windows": _object}
    EXPECTED: ClassVar[str] = '{"spec", "length", "fingerprint", ...}'


@dataclass(frozen=True)
class SourceRecord(_Record):
    """A set another was made from, as provenance records it: its path, data fingerprint,
    teacher weights and `identity` (the XXH3 of its digest). A subset's record adds the
    selection (fraction, seed, classes, indices, ...) in `extra`."""

    path: str | None = None
    fingerprint: str | None = None
    teacher: tuple[str, ...] | None = None
    identity: str | None = None

    PARSE: ClassVar[dict[str, Parser]] = {"path": _str, "fingerprint": _str,
                                          "teacher": _strings, "identity": _str}
    REQUIRED: ClassVar[tuple[str, ...]] = ("path",)
    EXPECTED: ClassVar[str] = '{"path", "fingerprint", "teacher", "identity", ...}'


@dataclass(frozen=True)
class ImportRecord(_Record):
    """What `softlabels import` read: its `format` and path, and the importer's own fields."""

    format: str | None = None
    path: str | None = None

    PARSE: ClassVar[dict[str, Parser]] = {"format": _str, "path": _str}
    REQUIRED: ClassVar[tuple[str, ...]] = ("format",)
    EXPECTED: ClassVar[str] = '{"format", "path"?, ...}'


@dataclass(frozen=True)
class Provenance(_Record):
    """Where a set came from when `precompute` did not make it: cut from, merged from,
    converted from other sets, or imported."""

    subset_of: SourceRecord | None = None
    merged_from: tuple[SourceRecord, ...] | None = None
    converted_from: SourceRecord | None = None
    imported_from: ImportRecord | None = None

    PARSE: ClassVar[dict[str, Parser]] = {
        "subset_of": _record(SourceRecord), "merged_from": _records(SourceRecord),
        "converted_from": _record(SourceRecord), "imported_from": _record(ImportRecord)}
    EXPECTED: ClassVar[str] = '{"subset_of"?, "merged_from"?, "converted_from"?, ...}'


@dataclass(frozen=True)
class SetInfo(_Record):
    """A set's descriptive metadata: everything in its root attribute but the layout keys
    (`Layout`) and the keys of one file (`format_version`, `status`, `completed_at`,
    `digest`). `num_examples` is the source data's length; `augment` and `view_seed` describe a
    view set's views (their number is `Layout.views`)."""

    teacher: TeacherInfo
    dataset: DatasetInfo
    num_examples: int
    class_names: tuple[str, ...] | None = None
    augment: str | None = None
    view_seed: int | None = None
    provenance: Provenance | None = None
    created_at: str | None = None
    versions: dict[str, str] | None = None
    device: str | None = None
    precision: str | None = None

    PARSE: ClassVar[dict[str, Parser]] = {
        "teacher": _record(TeacherInfo), "dataset": _record(DatasetInfo),
        "num_examples": _positive, "class_names": _strings, "augment": _str,
        "view_seed": _int, "provenance": _record(Provenance), "created_at": _str,
        "versions": _string_map, "device": _str, "precision": _str}
    REQUIRED: ClassVar[tuple[str, ...]] = ("teacher", "dataset", "num_examples")
    SKIP: ClassVar[tuple[str, ...]] = (*LAYOUT_KEYS, *FILE_KEYS)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], *, where: str = "the transfer set") -> SetInfo:
        """The descriptive part of a set's metadata, checked: a key of the wrong form raises
        `TransferSetError` in one line naming it. A complete set must record its data's
        fingerprint; a view set its augmentation."""
        try:
            info = cls.parse(dict(meta), "")
            if meta.get("status") == S.STATUS_COMPLETE and info.dataset.fingerprint is None:
                raise _Malformed("dataset", DatasetInfo.EXPECTED, meta.get("dataset"))
            if meta.get("views") and info.augment is None:
                raise ValueError("augment: a view set names its augmentation")
        except ValueError as exc:
            raise TransferSetError(f"{where} has malformed metadata ({exc}); get a fresh copy "
                                   "of the set") from None
        return info

    def replace(self, **changes: Any) -> SetInfo:
        """This information with `changes` (a new teacher, provenance, ...)."""
        return dataclasses.replace(self, **changes)

    def derived(self, **provenance: Any) -> SetInfo:
        """The information of a set made from this one: the same, with `provenance` entries
        (`subset_of=`, `converted_from=`: SourceRecord) added to this set's."""
        earlier = self.provenance or Provenance()
        return self.replace(provenance=dataclasses.replace(earlier, **provenance),
                            nulls=self.nulls - {"provenance"})


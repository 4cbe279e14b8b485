"""`wds:PATTERN`: tar shards as webdataset writes them, read as a map-style image dataset.

A sample is the run of consecutive members sharing a key (the member path up to the first dot
of its base name, as webdataset groups them): its image is the jpg/jpeg/png/webp member, its
label the cls (or json "label"/"cls", or an integer txt) member when there is one. Example i is
the i-th sample in the pattern's order, shard by shard, sample by sample as stored: the index
is stable as long as the shards are. The shards' headers are scanned once when opened
(tarfile's offset_data and size per member); an item is then one seek and one read.
Uncompressed tars only; links, devices and members reaching past their file are refused.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError
from softlabels.safe_read import open_input
from softlabels.sources.images import ImageSource, preprocess_from, refuse_unknown

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "json", "txt")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); '{x,y}' lists
    alternatives. Expanded left to right, in the pattern's order."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise SpecError(f"empty range {{{body}}} in {pattern!r}; write {{low..high}}")
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise SpecError(f"cannot expand {{{body}}} in {pattern!r}; use {{000..009}} or {{a,b}}")
    return [p for c in choices for p in expand_braces(head + c + tail)]


def _split_key(path: str) -> tuple[str, str]:
    """('dir/key', 'ext') as webdataset's base_plus_ext: key up to the basename's first dot."""
    folder, _, base = path.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


class TarShardSource(ImageSource):
    """Samples of webdataset tar shards, indexed once by their members' offsets."""

    def __init__(self, shards: list[str], preprocess: Any = None) -> None:
        self.shards, self.preprocess, self.classes = shards, preprocess, []
        where: list[tuple[int, str, int, int, int, int, str]] = []
        for s, path in enumerate(shards):
            where += [(s, *sample) for sample in _scan(path)]
        if not where:
            raise DataError(f"no samples with an image ({', '.join(IMAGE_EXTS)}) in "
                            f"{len(shards)} shard(s) from {shards[0]}")
        self.shard_of = np.array([w[0] for w in where], dtype=np.int32)
        self.keys = [w[1] for w in where]
        self.offsets = np.array([[w[2], w[3], w[4], w[5]] for w in where], dtype=np.int64)
        self.label_ext = [w[6] for w in where]
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:  # a spawned process opens its own files
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        # pread: no shared file offset, so forked DataLoader workers may share the descriptor
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DataError(f"cannot read {self.shards[shard]}: it ends inside a member (read "
                            f"{len(data)} of {size} bytes at {offset}); the shard was truncated")
        return data

    def read(self, i: int) -> bytes:
        off, size = self.offsets[i, :2]
        return self._bytes(int(self.shard_of[i]), int(off), int(size))

    def name(self, i: int) -> str:
        return f"{self.keys[i]} in shard {self.shards[int(self.shard_of[i])]}"

    def label(self, i: int) -> int:
        off, size = self.offsets[i, 2:]
        if off < 0:
            return -1
        text = self._bytes(int(self.shard_of[i]), int(off), int(size)).decode("utf-8", "replace")
        ext = self.label_ext[i]
        try:
            if ext == "json":
                obj = json.loads(text)
                value = obj.get("label", obj.get("cls", -1)) if isinstance(obj, dict) else obj
                return int(value)
            return int(text.strip())
        except (ValueError, TypeError):
            if ext == "txt":  # a caption, not a class
                return -1
            raise DataError(f"the label ({ext}) of sample {self.name(i)} is {text[:40]!r}, not "
                            "a class number; write the class as an integer") from None


def _scan(path: str) -> list[tuple[str, int, int, int, int, str]]:
    """(key, image offset, image size, label offset or -1, label size, label ext) per sample
    of one shard, in stored order."""
    try:
        size = os.path.getsize(path)
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot open shard {path}: {exc}; expected an uncompressed tar as "
                        "webdataset writes it") from None
    samples: list[tuple[str, int, int, int, int, str]] = []
    current: dict[str, Any] = {}
    with tar:
        try:
            members = list(tar)
        except tarfile.TarError as exc:
            raise DataError(f"cannot read shard {path}: {exc}; the shard is damaged") from None
    for m in members:
        if m.isdir():
            continue
        if not m.isfile():
            raise DataError(f"shard {path} has {m.name!r}, a link or device, not a file; shards "
                            "hold plain files only: rewrite the shard")
        if m.offset_data + m.size > size:
            raise DataError(f"shard {path}: member {m.name!r} claims {m.size} bytes at "
                            f"{m.offset_data}, past the file's {size}; the shard was truncated")
        key, ext = _split_key(m.name)
        if current and current["key"] != key:
            samples.append(_sample(current, path))
            current = {}
        current.setdefault("key", key)
        current[ext] = (m.offset_data, m.size)
    if current:
        samples.append(_sample(current, path))
    return samples


def _sample(members: dict[str, Any], path: str) -> tuple[str, int, int, int, int, str]:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        raise DataError(f"sample {members['key']!r} in shard {path} has no image (found "
                        f"{sorted(k for k in members if k != 'key')}; expected one of "
                        f"{', '.join(IMAGE_EXTS)}); every sample needs one")
    ext = next((e for e in LABEL_EXTS if e in members), "")
    label = members[ext] if ext else (-1, 0)
    return (members["key"], image[0], image[1], label[0], label[1], ext)


def tar_shards(body: str, options: dict[str, Any], spec: str) -> TarShardSource:
    preprocess = preprocess_from(options, spec)
    refuse_unknown(options, (), spec)
    shards = expand_braces(body)
    for p in shards:  # one that exists is a regular file, or is named as what it is
        if os.path.exists(p):
            open_input(p, "shard").close()
    missing = [p for p in shards if not os.path.isfile(p)]
    if missing:
        raise DataError(f"no such shard {missing[0]!r} ({len(missing)} of {len(shards)} "
                        f"missing, from {spec!r}); check the pattern")
    return TarShardSource(shards, preprocess)


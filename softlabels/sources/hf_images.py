"""`hfds:PATH?split=..&image=..&label=..`: images in a Hugging Face `datasets` directory
(written by `save_to_disk`) or in Parquet files (one file, or a directory of *.parquet read in
sorted name order) with an image column as `datasets` stores it: a struct of `bytes` and `path`.
The bytes are decoded with torchvision.io (never PIL). Class names come from a ClassLabel
feature (the `datasets` directory's features, or the Parquet schema's "huggingface" metadata).
A `datasets` directory needs the optional extra `datasets`; Parquet needs only pyarrow.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

from softlabels.errors import DataError
from softlabels.safe_read import open_input
from softlabels.sources.images import ImageSource, preprocess_from, refuse_unknown
from softlabels.sources.saved_datasets import load_saved

OPTIONS = ("split", "image", "label")


class ParquetImages(ImageSource):
    """Rows of Parquet files, read one row group at a time (a DataLoader walking the rows in
    order reads each group once)."""

    def __init__(self, files: list[str], image: str, label: str | None, preprocess: Any) -> None:
        self.files, self.image, self.preprocess = files, image, preprocess
        self.groups: list[tuple[int, int]] = []  # (file, row group) in row order
        self.starts: list[int] = []
        total = 0
        for f, path in enumerate(files):
            meta = _parquet(path).metadata
            for g in range(meta.num_row_groups):
                self.groups.append((f, g))
                self.starts.append(total)
                total += meta.row_group(g).num_rows
        self.total = total
        schema = _parquet(files[0]).schema_arrow
        self.label_column = _label_column(files[0], schema.names, image, label)
        self.classes = _class_names(_hf_features(schema.metadata), self.label_column)
        self._cached: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": None}

    def __len__(self) -> int:
        return self.total

    def _row(self, i: int) -> dict[str, Any]:
        g = bisect.bisect_right(self.starts, i) - 1
        if self._cached is None or self._cached[0] != g:
            f, group = self.groups[g]
            columns = [self.image] + ([self.label_column] if self.label_column else [])
            self._cached = (g, _parquet(self.files[f]).read_row_group(group, columns=columns))
        table = self._cached[1]
        return {name: table.column(name)[i - self.starts[g]].as_py()
                for name in table.column_names}

    def read(self, i: int) -> bytes:
        return _image_bytes(self._row(i)[self.image], self.name(i))

    def name(self, i: int) -> str:
        g = bisect.bisect_right(self.starts, i) - 1
        return f"row {i - self.starts[g]} of {self.files[self.groups[g][0]]}"

    def label(self, i: int) -> int:
        return int(self._row(i)[self.label_column]) if self.label_column else -1


class SavedImages(ImageSource):
    """A `datasets.Dataset` read back with `load_from_disk`, its image column undecoded."""

    def __init__(self, data: Any, path: str, image: str, label: str | None,
                 preprocess: Any) -> None:
        from datasets import Image

        self.label_column = _label_column(path, data.column_names, image, label)
        self.data = data.cast_column(image, Image(decode=False))
        self.path, self.image, self.preprocess = path, image, preprocess
        feature = data.features.get(self.label_column) if self.label_column else None
        self.classes = [str(n) for n in getattr(feature, "names", None) or []]
        if self.label_column:
            self.targets = list(self.data[self.label_column])

    def __len__(self) -> int:
        return len(self.data)

    def read(self, i: int) -> bytes:
        return _image_bytes(self.data[i][self.image], self.name(i))

    def name(self, i: int) -> str:
        return f"row {i} of {self.path}"

    def label(self, i: int) -> int:
        return int(self.targets[i]) if self.label_column else -1


def _parquet(path: str) -> Any:
    import pyarrow.parquet as pq

    open_input(path, "Parquet file").close()  # in a folder of them, a fifo: pyarrow would wait
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read {path} as Parquet: {str(exc).splitlines()[0]}") from None


def _hf_features(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    try:
        return json.loads((metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return {}


def _class_names(features: dict[str, Any], label: str | None) -> list[str]:
    feature = features.get(label or "", {})
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names or []]


def _image_bytes(value: Any, where: str) -> bytes:
    """The encoded bytes of one image cell: a struct {bytes, path}, or raw bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if isinstance(value, dict) and value.get("path") and os.path.isfile(value["path"]):
        with open(value["path"], "rb") as f:
            return f.read()
    raise DataError(f"{where} has no image bytes (found {type(value).__name__}"
                    f"{' with path ' + repr(value.get('path')) if isinstance(value, dict) else ''}"
                    "); store the images in the dataset (datasets' Image feature)")


def hf_images(body: str, options: dict[str, Any], spec: str) -> ImageSource:
    preprocess = preprocess_from(options, spec)
    refuse_unknown(options, OPTIONS, spec)
    image, label = str(options.get("image", "image")), str(options.get("label", "label"))
    path = Path(body)
    if path.is_file() or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        return ParquetImages(files, image, label, preprocess)
    if path.exists() and not path.is_dir():  # a fifo or a device: named as what it is
        open_input(path, "Parquet file").close()
    if not path.is_dir():
        raise DataError(f"no such file or directory {body!r} (from {spec!r}); check the path")
    data = load_saved(path)
    from datasets import DatasetDict  # load_saved has found it

    if isinstance(data, DatasetDict):
        split = options.get("split")
        if split not in data:
            raise DataError(f"{body} holds splits {sorted(data)}; pick one with split=, e.g. "
                            f"hfds:{body}?split={sorted(data)[0]}")
        data = data[split]
    return SavedImages(data, body, image, label, preprocess)


def _label_column(where: Any, columns: list[str], image: str, label: str | None) -> str | None:
    """The label column of a table with `columns` (None: unlabelled), after checking that the
    image column is there; a label column named other than the default must be there too."""
    if image not in columns:
        raise DataError(f"{where} has no column {image!r} (columns: {columns}); name the "
                        "image column with image=")
    found = label if label and label in columns else None
    if label and label != "label" and found is None:
        raise DataError(f"{where} has no label column {label!r} (columns: {columns})")
    return found

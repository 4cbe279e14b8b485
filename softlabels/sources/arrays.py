"""Example data: the datasets behind the example DATA specs (an .npz of arrays, a
torchvision dataset, an image folder), checked labels, and the (input, label) items every
example set is made from. `specs.load_data` builds them from their specs; token sequences are
tokens.py's."""

from __future__ import annotations

import inspect
import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import DataError, SpecError
from softlabels.format.schema import sample_hash


class NpzDataset(Dataset):
    """Arrays `x` (N, ...) and optional `y` (N,) from an .npz; uint8 inputs are scaled to [0, 1]."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        check_npz_members(path)  # before numpy allocates what a member's header claims
        try:
            with np.load(path, allow_pickle=False) as f:
                if "x" not in f.files:
                    raise DataError(
                        f"{path} has no array 'x' (found {sorted(f.files)}); save the inputs "
                        "as x, e.g. numpy.savez(path, x=inputs, y=labels)"
                    )
                x, y = f["x"], (f["y"] if "y" in f.files else None)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            what = ("not an .npz archive" if "pickle" in str(exc) or isinstance(exc, EOFError)
                    else str(exc).splitlines()[0])
            raise DataError(f"cannot read {path} as .npz ({what}); write it with "
                            "numpy.savez(path, x=inputs, y=labels)") from None
        scale = 1 / 255 if x.dtype == np.uint8 else 1.0
        self.x = torch.from_numpy(np.ascontiguousarray(x)).float() * scale
        if y is not None and len(y) != len(x):
            raise DataError(f"{path}: y has {len(y)} rows but x has {len(x)}; they must match")
        self.y = torch.full((len(x),), -1) if y is None else torch.from_numpy(
            check_labels(y, where=str(path)))
        labelled = self.y[self.y >= 0]
        self.classes = [str(c) for c in range(int(labelled.max()) + 1)] if len(labelled) else []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])

    def get_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Items `rows` at once: inputs (B, ...) and int64 labels (B,), one indexing operation
        each (a slice where the rows are consecutive), what `dataset[i]` gives row by row."""
        return batch_of(self.x, rows), batch_of(self.y, rows)


def check_npz_members(path: str | os.PathLike[str]) -> None:
    """Refuse an .npz whose member's header claims more bytes (shape times item size) than the
    member stores: numpy allocates the claim before reading (a 1 KB file claiming (10^12, 16)
    float32 asked for 58 TiB, a traceback). Anything else unreadable is left to numpy's own
    error."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile):
        return
    with z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            try:
                with z.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                            np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(member)
                    header = member.tell()
            except (OSError, ValueError, zipfile.BadZipFile, EOFError):
                continue  # numpy's own reading says what is wrong
            claimed = math.prod(shape) * dtype.itemsize
            stored = info.file_size - header
            if claimed > stored:
                name = info.filename.removesuffix(".npy")
                raise DataError(f"{path}: the array {name!r} claims shape {tuple(shape)} "
                                f"{dtype} ({claimed} bytes) but stores {stored} bytes; the "
                                "file was cut short or edited (nothing was allocated): write "
                                "it again with numpy.savez(path, x=inputs, y=labels)")


def batch_of(t: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """t[rows] along the first axis: a view for consecutive rows, else one gather."""
    if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows) and (
            len(rows) < 3 or bool((np.diff(rows) == 1).all())):
        return t[int(rows[0]):int(rows[-1]) + 1]
    return t[torch.as_tensor(np.asarray(rows, dtype=np.int64))]


def check_labels(y: np.ndarray, *, where: str, num_classes: int | None = None) -> np.ndarray:
    """Labels as int64, refusing what no class can be: non-integer values, values below -1
    (-1 = unknown) and, given `num_classes`, values at or above it. Names the first bad one."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be one number per example, found shape "
                        f"{y.shape}; save y as a 1-D integer array")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
            or y.dtype == np.bool_):
        raise DataError(f"{where}: labels must be integers, found dtype {y.dtype}")
    bad = ~np.isfinite(y) | (y != np.round(y)) if np.issubdtype(y.dtype, np.floating) else None
    if bad is not None and bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: label {y[i].item()!r} of example {i} is not a whole "
                        "number; labels are class numbers 0..C-1, or -1 for unknown")
    yi = y.astype(np.int64)
    high = num_classes if num_classes is not None else np.iinfo(np.int64).max
    bad = (yi < -1) | (yi >= high)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        rule = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
        raise DataError(f"{where}: label {int(yi[i])} of example {i} is not a class; labels "
                        f"must be {rule}, or -1 for unknown")
    return yi


def to_tensor(size: int | None = None) -> Callable[[Any], torch.Tensor]:
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage()]
    if size:
        steps += [v2.Resize(size), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def torchvision_dataset(name: str, root: str, options: dict[str, Any], spec: str) -> Dataset:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if not inspect.isclass(cls):
        raise SpecError(f"torchvision.datasets has no dataset {name!r} (from {spec!r})")
    split = str(options.pop("split", "train"))
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"transform": to_tensor(options.pop("size", None)), **options}
    if "train" in params:
        if split not in ("train", "test"):
            raise SpecError(f"split must be train or test for {name}, got {split!r}")
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    if "download" in params:
        kwargs["download"] = False  # never touch the network
    if not Path(root).exists():
        raise DataError(f"data root {root!r} of {spec!r} does not exist; check ROOT")
    try:
        return cls(root, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot load {name} from {root!r}: {str(exc).splitlines()[0]}; put the files under "
            "ROOT as torchvision expects (nothing is downloaded)"
        ) from None


def class_names(data: Dataset) -> list[str]:
    """The dataset's class names where it has them (torchvision's `classes`), else []."""
    return [str(c) for c in getattr(data, "classes", None) or []]


def split_item(item: Any) -> tuple[torch.Tensor, int]:
    """(input, label) from a dataset item; a bare input gets label -1. A label that is not a
    whole number is refused, never truncated."""
    if isinstance(item, (tuple, list)):
        x, y = item[0], (item[1] if len(item) > 1 else -1)
    else:
        x, y = item, -1
    label = int(y)
    if label != y:
        raise DataError(f"label {y!r} is not a whole number; labels are class numbers 0..C-1, "
                        "or -1 for unknown")
    return torch.as_tensor(x), label


def hashed_item(data: Dataset, i: int) -> tuple[torch.Tensor, int, int]:
    """(input, label, sample hash) of example i. A dataset may define its own `hashed_item`
    (image sources hash the encoded file, whatever transform they apply); otherwise the hash
    covers the input tensor's bytes."""
    own = getattr(data, "hashed_item", None)
    if own is not None:
        return own(i)
    x, y = split_item(data[i])
    return x, y, sample_hash(x.numpy())


def example_hash(data: Dataset, i: int) -> int:
    """The sample hash of example i (see `hashed_item`), without decoding where the dataset
    can hash its stored bytes (`example_hash`)."""
    own = getattr(data, "example_hash", None)
    return own(i) if own is not None else hashed_item(data, i)[2]

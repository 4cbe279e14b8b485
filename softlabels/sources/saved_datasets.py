"""A Hugging Face `datasets` directory (`save_to_disk`) loaded with its files checked first:
every file in it must be a regular file (a fifo in place of an Arrow file hung
`load_from_disk`), its JSON descriptions (`state.json`, `dataset_info.json`,
`dataset_dict.json`) at most `MAX_DESCRIPTION_BYTES` (one grown to gigabytes of holes was read
whole), and whatever `load_from_disk` cannot read (an empty or random Arrow file, a description
that is not JSON) ends in one line naming the directory instead of pyarrow's traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from softlabels.errors import DataError, SpecError
from softlabels.safe_read import MAX_DESCRIPTION_BYTES, open_input

DESCRIPTIONS = ("state.json", "dataset_info.json", "dataset_dict.json")


def load_saved(path: str | os.PathLike[str]) -> Any:
    """`datasets.load_from_disk(path)` (a Dataset or a DatasetDict), its files checked."""
    path = Path(path)
    try:
        import datasets
        import pyarrow as pa
    except ImportError:
        raise SpecError(f"reading {path} needs the `datasets` package: pip install "
                        "'softlabels[datasets]'") from None
    for root, dirs, files in os.walk(path):  # a DatasetDict holds one folder per split
        dirs.sort()
        for name in files:
            with open_input(Path(root) / name, "file of a `datasets` directory") as f:
                size = os.fstat(f.fileno()).st_size
            if name in DESCRIPTIONS and size > MAX_DESCRIPTION_BYTES:
                raise DataError(f"{Path(root) / name} holds {size} bytes, more than a "
                                f"`datasets` description takes ({MAX_DESCRIPTION_BYTES}); the "
                                "directory is damaged: save it again with save_to_disk")
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise DataError(f"{path} is not a readable `datasets` directory ({type(exc).__name__}: "
                        f"{first}); it is damaged or was not written by save_to_disk: save it "
                        "again") from None

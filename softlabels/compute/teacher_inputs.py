"""What the teacher sees: the data's items mapped through the teacher's own preprocessing.

An image source (imagefolder, hfds, wds) yields decoded uint8 images (3, H, W) and says so
with `raw_images = True`; a teacher that carries a `Preprocess` (from its weights entry, timm
config or HF image processor, or the spec's overrides) gets each image resized, cropped and
normalised as it was trained. The sample hash is the source's (over the preprocessed tensor, unless
the source defines its own, as image sources hashing the encoded file do), and the
preprocessing is recorded in the set's metadata (`teacher.preprocess`), from which `verify`
rebuilds it (`Preprocess.from_meta`), never from code.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset

from softlabels.preprocessing import Preprocess, describe
from softlabels.sources.arrays import split_item

log = logging.getLogger(__name__)


class Preprocessed(Dataset):
    """`data`'s items (uint8 image (3, H, W), label) as (preprocess(image), label)."""

    def __init__(self, data: Dataset, preprocess: Preprocess) -> None:
        self.data, self.preprocess = data, preprocess
        for name in ("classes", "targets", "y"):  # labels and class names, as the source has
            if hasattr(data, name):
                setattr(self, name, getattr(data, name))

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = split_item(self.data[i])
        return self.preprocess(x), y


def raw_images(data: Any) -> bool:
    """Whether `data` yields decoded uint8 images for a teacher's preprocessing to apply."""
    return getattr(data, "raw_images", False) is True


def teacher_inputs(data: Dataset, preprocess: Preprocess | None,
                   ) -> tuple[Dataset, Preprocess | None]:
    """(the dataset the teacher runs on, the preprocessing applied to it or None).

    Applied to raw images only, through the source's own `with_preprocess` where it has one
    (an image source then keeps its own sample hash), else by the `Preprocessed` wrapper. For
    other data (arrays already made into tensors) the teacher's preprocessing is not applied,
    and a warning says so."""
    if preprocess is None:
        return data, None
    if not raw_images(data):
        log.warning("the teacher's own preprocessing (%s) is not applied: the DATA yields "
                    "tensors, not raw images (an image source such as imagefolder: does); "
                    "its inputs go to the teacher as they are", describe(preprocess.to_meta()))
        return data, None
    return _through(data, preprocess), preprocess


def _through(data: Dataset, preprocess: Preprocess) -> Dataset:
    own = getattr(data, "with_preprocess", None)
    return own(preprocess) if callable(own) else Preprocessed(data, preprocess)


def replay_inputs(data: Dataset, recorded: dict[str, Any] | None) -> Dataset:
    """`data` as a set's recorded teacher saw it: raw images through the recorded
    preprocessing, rebuilt from the metadata (never from code), when one was applied. Other
    data is returned as it is (its sample hashes then show whether it is what was used)."""
    if not recorded or not raw_images(data):
        return data
    return _through(data, Preprocess.from_meta(recorded))

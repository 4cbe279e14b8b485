"""Attacks on the surfaces added in one session (pretrained teachers, `text:` data, export and
import), each a case that used to end in a traceback, a huge allocation or a silently wrong
result; every one must now end in one line naming what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softlabels.errors import DataError, SpecError
from softlabels.preprocessing import Preprocess

# --- teacher preprocessing overrides ----------------------------------------------------------


@pytest.mark.parametrize("options, match", [
    ({"resize": 32, "crop": 64}, r"crop=64 is larger than resize=32"),
    ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, r"mean=\(0.5, 0.5\) has 2 values; images are RGB"),
    ({"resize": 100_000}, r"resize=100000 must be a whole number of pixels in \[1, 4096\]"),
])
def test_preprocessing_overrides_that_make_no_sense_are_refused(options: dict,
                                                                 match: str) -> None:
    with pytest.raises(SpecError, match=match):
        Preprocess(**options)


def test_a_crop_larger_than_the_image_is_refused_not_padded() -> None:
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert Preprocess(crop=20)(image).shape == (3, 20, 20)
    with pytest.raises(DataError, match=r"20x30 pixels is smaller than crop=24"):
        Preprocess(crop=24)(image)

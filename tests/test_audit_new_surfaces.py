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


# --- vLLM prompt log-probs --------------------------------------------------------------------

GOOD = '{"prompt_token_ids": [1, 2], "prompt_logprobs": [null, {"2": -0.1, "3": -3.0}]}\n'


def import_vllm_text(tmp_path: Path, text: str | bytes, **options) -> dict:
    from softlabels.vllm_logprobs import import_vllm

    path = tmp_path / "v.jsonl"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    kwargs = {"topk": 2, "vocab_size": 40, "teacher_name": "T"} | options
    return import_vllm(path, tmp_path / "out.zarr", **kwargs)


def test_vllm_a_good_line_imports(tmp_path: Path) -> None:
    assert import_vllm_text(tmp_path, GOOD)["num_rows"] == 2


@pytest.mark.parametrize("text, match", [
    (GOOD.replace('"3"', '"1' + "0" * 40 + '"'), r"token id '10+' is not an integer in "),
    (GOOD.replace('"3"', '"\\u0663"'), r"token id '٣' is not an integer"),  # Arabic-Indic 3
    (GOOD.replace('"3"', '"\\u00b2"'), r"token id '²' is not an integer"),
    (GOOD.replace('{"2": -0.1,', '{"2": -0.1, "2": -0.5,'), r"line 1: the key '2' appears twice"),
    (GOOD.replace("[1, 2]", "[1, 2]").encode() + b'{"x": "\xff"}\n', r"line 2 is not UTF-8"),
])
def test_vllm_lines_that_used_to_pass_or_crash(tmp_path: Path, text: str | bytes,
                                               match: str) -> None:
    with pytest.raises(DataError, match=match):
        import_vllm_text(tmp_path, text)
    assert not (tmp_path / "out.zarr").exists()


def test_vllm_huge_declared_sizes_allocate_nothing(tmp_path: Path) -> None:
    from softlabels.errors import OptionError

    with pytest.raises(DataError, match=r"2 entries, expected 100000000"):
        import_vllm_text(tmp_path, GOOD, topk=10**8, vocab_size=2**31)  # was 8 GiB per row
    for vocab in (10**12, -3):
        with pytest.raises(OptionError, match=r"--vocab-size must lie in \[2, 2147483648\]"):
            import_vllm_text(tmp_path, GOOD, vocab_size=vocab)

"""The MODEL spec `hf:DIR`: a local Hugging Face `transformers` causal language model as a
teacher (or student) mapping (B, L) token ids to (B, L, V) logits.

Nothing is downloaded (`local_files_only`), weights load from safetensors only (never a pickle),
and no code from the directory runs (`trust_remote_code=False`). Needs the `hf` extra:
`pip install 'softlabels[hf]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SpecError


class CausalLM(nn.Module):
    """(B, L) int64 token ids -> (B, L, V) logits of a `transformers` causal LM.

    Causal: a position's logits depend only on the tokens up to it, so right-padding a batch
    leaves every real position's logits unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def load_hf(directory: str, options: dict[str, Any], spec: str) -> nn.Module:
    """The causal LM saved (with `save_pretrained`) in `directory`."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SpecError(f"{spec!r} needs transformers and safetensors: "
                        "pip install 'softlabels[hf]'") from None
    if options:
        raise SpecError(f"hf: specs take no options, got {sorted(options)} in {spec!r}")
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise SpecError(f"{directory!r} (from {spec!r}) holds no config.json; save the model "
                        "there with save_pretrained (nothing is downloaded)")
    hf_logging.disable_progress_bar()  # the library never draws progress bars
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot load {spec!r}: {str(exc).splitlines()[0]}; it needs "
                        "config.json and model.safetensors from save_pretrained") from None
    return CausalLM(model)

"""Token data checked against its teacher before the first batch (docs/TEXT.md,
"Strictness"): ids within the teacher's vocabulary, lengths within its context, something to
distil, labels among its classes. Each refusal is one line naming the sequence (its number, its
file and its line, row or window); nothing is written before these checks pass.

The vocabulary and context come from what each member declares: an `hf:` causal LM its input
embedding's size and its config's `max_position_embeddings` (GPT-2's `n_positions`); a `gpt:`
model its embedding and `context`; any other module its `vocab_size` and `context` attributes
when it has them (int). The smallest over the members applies; an undeclared one is not checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from softlabels.errors import DataError
from softlabels.sources.tokens import TokenSequences
from softlabels.teachers.ensemble import Teacher
from softlabels.teachers.gpt import TinyGPT


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def member_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary, context) one teacher module declares (module docstring); None: unknown."""
    if isinstance(model, TinyGPT):
        return model.tok.num_embeddings, model.context
    inner = getattr(model, "model", model)  # hf.CausalLM wraps a transformers model
    config = getattr(inner, "config", None)
    if config is not None and hasattr(inner, "get_input_embeddings"):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        embedding = inner.get_input_embeddings()
        vocab = (embedding.num_embeddings if isinstance(embedding, nn.Embedding)
                 else _int(getattr(text, "vocab_size", None)))
        return vocab, _int(getattr(text, "max_position_embeddings", None))
    return _int(getattr(model, "vocab_size", None)), _int(getattr(model, "context", None))


def teacher_limits(teacher: Teacher) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """((vocabulary, the member declaring it), (context, its member)), the smallest over the
    members; None where no member declares one."""
    vocab = context = None
    for member in teacher.members:
        v, c = member_limits(member.model)
        if v is not None and (vocab is None or v < vocab[0]):
            vocab = (v, member.source)
        if c is not None and (context is None or c < context[0]):
            context = (c, member.source)
    return vocab, context


def check_something_to_distil(data: TokenSequences) -> None:
    """Refuse data whose mask is 0 at every position."""
    if data.mask is not None and not data.mask.any():
        raise DataError(f"nothing to distil: every position of {data.where} is masked out (its "
                        "mask is 0 everywhere); give data with positions to distil (mask 1), "
                        "e.g. conversations with assistant turns for mask=assistant")


def check_fits_teacher(data: TokenSequences, teacher: Teacher) -> None:
    """Refuse ids past the teacher's vocabulary and sequences past its context."""
    vocab, context = teacher_limits(teacher)
    if vocab is not None and data.tokens.max() >= vocab[0]:
        p = int(np.argmax(data.tokens >= vocab[0]))
        s = data.sequence_at(p)
        raise DataError(f"{data.describe(s)}: token id {int(data.tokens[p])} at position "
                        f"{p - int(data.offsets[s])} is not in the teacher's vocabulary of "
                        f"{vocab[0]} ids ({vocab[1]}); tokenise the text with the teacher's "
                        "own tokenizer (text:...?tokenizer=DIR)")
    if context is not None and data.lengths.max() > context[0]:
        s = int(np.argmax(data.lengths > context[0]))
        size = context[0]
        raise DataError(f"{data.describe(s)} has {int(data.lengths[s])} tokens, more than the "
                        f"teacher's context of {size} ({context[1]}); cut long sequences into "
                        f"windows: add max_length={size}&stride={size // 4} to the DATA spec "
                        "(windows overlap by stride tokens; each position is distilled once)")


def check_labels(data: TokenSequences, num_classes: int) -> None:
    """Refuse data labels outside [-1, num_classes) (next-token labels map those to -1)."""
    if data.labels is None or data.next_token_labels:
        return
    bad = data.labels >= num_classes
    if bad.any():
        p = int(np.argmax(bad))
        s = data.sequence_at(p)
        raise DataError(f"{data.describe(s)}: label {int(data.labels[p])} at position "
                        f"{p - int(data.offsets[s])} is not among the teacher's {num_classes} "
                        "classes; labels are class ids in [-1, classes)")

"""The checks of a student against the data and the set, before any step: an example student
maps (B, ...) examples to (B, C) logits with the set's (or the labels') C; a sequence student
maps (B, L) token ids to (B, L, C) logits with the set's C (or at least the data's
vocabulary); a selection of sequences has some position to distil."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from softlabels.errors import DataError, MismatchError
from softlabels.format.reader import TransferSet
from softlabels.sources.tokens import TokenSequences
from softlabels.train.padded import SequenceBatches

NOTHING_TO_DISTIL = ("nothing to distil: every position of the chosen sequences is masked out "
                     "(mask 0 everywhere); choose sequences with positions to distil (mask 1), "
                     "e.g. conversations with assistant turns for mask=assistant")


def check_outputs(net: nn.Module, x: torch.Tensor, ts: TransferSet | None,
                   y_all: torch.Tensor, *,
                   sequence_hint: str = "trains from a sequence set: precompute one from "
                                        "tokens:... DATA") -> None:
    """Refuse a student whose output size differs from the set's (or the labels') classes;
    `sequence_hint` ends the message when the student looks like a sequence model."""
    with torch.no_grad():
        was = net.training
        net.eval()
        sequence_model = any(isinstance(m, nn.Embedding) for m in net.modules())
        hint = (f"; a sequence model (token ids in, (B, L, C) logits out) {sequence_hint}"
                if sequence_model else "")
        try:
            z = net(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MismatchError(f"the student cannot take the data's inputs shaped "
                                f"{tuple(x.shape[1:])} ({first}); give it a matching input "
                                f"size{hint}") from None
        net.train(was)
        if z.dim() != 2:
            raise MismatchError(f"the student maps inputs shaped {tuple(x.shape[1:])} to "
                                f"{tuple(z.shape[1:])} per example, expected (C,) logits; give "
                                f"--model an example model{hint}")
        c = int(z.shape[-1])
    want = ts.num_classes if ts is not None else int(y_all.max()) + 1
    if (ts is not None and c != want) or c < want:
        source = f"{ts.path} has {want} classes" if ts is not None else f"labels reach {want - 1}"
        raise MismatchError(f"the student predicts {c} classes but {source}; give the model "
                            f"{want} outputs")


def check_sequence_student(net: nn.Module, ids: torch.Tensor, classes: int | None, *,
                           where: str, device: torch.device | str = "cpu") -> int:
    """Refuse a student that does not map (B, L) token ids to (B, L, `classes`) logits (any C
    when `classes` is None); `ids` (L,): a probe holding the data's largest token id. Returns
    the student's C."""
    x = ids[None].long()
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            z = net(x.to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MismatchError(f"the student cannot take (B, L) token ids (ids up to "
                            f"{int(ids.max())} here; {type(exc).__name__}: {first}); a sequence "
                            "set trains a model mapping (B, L) token ids "
                            f"to (B, L, C) logits: give --model such a model, or train an "
                            "example model from an example set") from None
    finally:
        net.train(was)
    shape = tuple(getattr(z, "shape", ()))
    if len(shape) != 3 or shape[:2] != tuple(x.shape):
        raise MismatchError(f"the student maps {tuple(x.shape)} token ids to {shape}, expected "
                            f"(B, L, C) logits, one row per token; give --model a sequence "
                            "model, or train this one from an example set")
    if classes is not None and shape[2] != classes:
        raise MismatchError(f"the student predicts {shape[2]} classes per token but {where}; "
                            f"give the model {classes} outputs")
    return int(shape[2])


def check_masked_in(batches: SequenceBatches) -> None:
    """Refuse a selection of sequences (in memory) whose mask is 0 at every position."""
    mask = np.concatenate([[0], np.cumsum(batches.columns["mask"], dtype=np.int64)])
    s = batches.sequences
    if not (mask[batches.offsets[s + 1]] - mask[batches.offsets[s]]).any():
        raise DataError(NOTHING_TO_DISTIL)


def check_student_vocabulary(data: TokenSequences, classes: int) -> None:
    """Refuse a student with fewer outputs than the data's next tokens (and labels) need; more
    (a vocabulary larger than the ids this data holds) is fine."""
    need = int(data.tokens.max()) + 1
    if data.labels is not None and not data.next_token_labels:
        need = max(need, int(data.labels.max()) + 1)
    if classes < need:
        raise MismatchError(f"the student predicts {classes} classes per token but the data "
                            f"reaches id {need - 1}; give the model at least {need} outputs "
                            "(its vocabulary)")

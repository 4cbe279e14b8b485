"""Conversations rendered with a tokenizer's own chat template, and which rows to distil.

The template is data (tokenizer_config.json or chat_template.jinja): a Jinja template that
transformers runs in its sandboxed environment (jinja2's ImmutableSandboxedEnvironment), which
offers no access to Python objects beyond the messages; it picks no code to import or run.

With `mask=assistant`, only rows that predict an assistant token are distilled. A row of a
sequence set is the teacher's prediction of the *next* token, so row p's mask is 1 exactly when
token p + 1 belongs to an assistant turn (HF's `labels = -100` convention, shifted by the
model); the last row predicts no token of the conversation and is masked out. Assistant tokens
are found:
- by the template's `{% generation %}` markers where it has them (transformers'
  `return_assistant_tokens_mask`, from character offsets), else
- by rendering the conversation prefix by prefix: the tokens of an assistant turn i are those
  between the rendering of messages[:i] with the generation prompt and that of messages[:i+1];
  both must be token prefixes of the whole conversation's tokens, or the conversation is
  refused (the template renders earlier turns differently once later ones exist: add
  `{% generation %}` markers to it).
Either way the assistant turn's tokens include what the template writes after its content up to
the next turn (an end-of-turn token, say), so the student learns to end a turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError
from softlabels.sources.tokens import Origin

GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
MASKS = ("all", "assistant")


def chat_template(tokenizer: Any, spec: str) -> str:
    """The tokenizer's default chat template, or a one-line refusal without one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise SpecError(f"the tokenizer of {spec!r} has no chat template; give tokenizer= a "
                        "save_pretrained directory whose tokenizer_config.json or "
                        "chat_template.jinja holds one")
    return template


def assistant_method(template: str) -> str:
    """'generation' where the template marks assistant tokens, else 'prefix'."""
    return "generation" if GENERATION.search(template) else "prefix"


def _check(conversation: Any, where: str) -> list[dict[str, str]]:
    ok = isinstance(conversation, list) and conversation and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in conversation)
    if not ok:
        raise DataError(f"{where}: expected a non-empty list of messages "
                        "{\"role\": ..., \"content\": ...} (strings), found "
                        f"{str(conversation)[:60]!r}")
    return conversation


def _ids(tokenizer: Any, messages: list[dict[str, str]], where: str, *,
         generation_prompt: bool = False, assistant_mask: bool = False) -> dict[str, Any]:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt,
            return_assistant_tokens_mask=assistant_mask)
    except Exception as exc:  # noqa: BLE001 (a template error: jinja2 raises many types)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: the chat template failed on it ({type(exc).__name__}: "
                        f"{first}); check its messages") from None


def _prefix_mask(tokenizer: Any, messages: list[dict[str, str]], ids: list[int],
                 where: str) -> np.ndarray:
    """(L,) 1 on the tokens of assistant turns, found by rendering prefix by prefix."""
    mask = np.zeros(len(ids), np.int64)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, messages[:i], where, generation_prompt=True)["input_ids"] \
            if i else []
        upto = _ids(tokenizer, messages[:i + 1], where)["input_ids"]
        if ids[:len(before)] != list(before) or ids[:len(upto)] != list(upto) \
                or len(before) > len(upto):
            raise DataError(f"{where}: its chat template does not render the conversation up "
                            f"to message {i} as a prefix of the whole, so the assistant tokens "
                            "cannot be found by prefixes; add {% generation %} markers to the "
                            "template (or use mask=all)")
        mask[len(before):len(upto)] = 1
    return mask


def render_chats(tokenizer: Any, conversations: Sequence[Any], origin: Origin, *,
                 mask: str, spec: str) -> tuple[list[list[int]], list[np.ndarray] | None, str]:
    """(token ids, row masks or None for mask=all, the method that found assistant tokens) of
    every conversation (module docstring)."""
    if mask not in MASKS:
        raise SpecError(f"mask={mask!r} in {spec!r}; a chat file takes mask=assistant (distil "
                        "the assistant's tokens only) or mask=all")
    method = assistant_method(chat_template(tokenizer, spec))
    ids, masks = [], []
    for s, conversation in enumerate(conversations):
        where = origin.describe(s)
        messages = _check(conversation, where)
        if mask == "all":
            ids.append(list(_ids(tokenizer, messages, where)["input_ids"]))
            continue
        out = _ids(tokenizer, messages, where, assistant_mask=method == "generation")
        tokens = list(out["input_ids"])
        assistant = (np.asarray(out["assistant_masks"], np.int64) if method == "generation"
                     else _prefix_mask(tokenizer, messages, tokens, where))
        ids.append(tokens)
        masks.append(np.append(assistant[1:], 0))  # row p predicts token p + 1
    return ids, (masks if mask == "assistant" else None), method

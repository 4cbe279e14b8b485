"""Token DATA the sequence tests share, wherever they sit in the tree: token files over the
tiny language model's vocabulary (`write_tokens`, for `python:helpers:tiny_lm`), and a
WordLevel tokenizer trained on a few sentences (one token per word, so a conversation's tokens
can be counted piece by piece), saved as Hugging Face saves one (`save_tokenizer`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 11
TEACHER = "python:helpers:tiny_lm"


def write_tokens(path: Path, n: int = 23, seed: int = 0, masks: bool = False) -> str:
    """n sequences of 1..14 tokens (195 positions for seed 0: not a multiple of CHUNK)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(n):
            toks = rng.integers(0, VOCAB, int(rng.integers(1, 15))).tolist()
            row = {"input_ids": toks, "loss_mask": [int(i >= 2) for i in range(len(toks))]}
            f.write(json.dumps(row if masks else toks) + "\n")
    return f"tokens:{path}"


WORDS = ["the cat sat on the mat", "a dog ran in the park", "hello world how are you",
         "i am fine thank you", "what is the time now", "it is late"]
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
# one template marks the assistant's tokens for transformers, the other leaves it to prefixes
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> "
          "{% generation %}{{ m['content'] }} <|end|>{% endgeneration %}{% else %}<|user|> "
          "{{ m['content'] }} <|end|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PLAIN = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def save_tokenizer(path: Path, template: str | None = MARKED) -> Any:
    """A WordLevel tokenizer (adds <s> to a document), saved with save_pretrained."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return fast

"""Raw text as token sequences: the DATA spec `text:`, tokenised with the teacher's own
tokenizer (tokenizer_files.py) into the sequences of a sequence set (docs/TEXT.md).

    text:FILE.txt?tokenizer=DIR          the file is one document
    text:DIR?tokenizer=DIR               every *.txt under DIR (links to folders not followed),
                                         one document each, in sorted relative-path order
    text:FILE.jsonl?tokenizer=DIR&field=text
                                         one document a line: the string in `field`
    text:FILE.jsonl?tokenizer=DIR&chat=messages&mask=assistant
                                         one conversation a line, rendered with the
                                         tokenizer's chat template (chat.py)

Options: `max_length=N&stride=M` (documents longer than N tokens cut into windows sharing M
tokens: token_windows.py). Text is UTF-8 (a leading byte-order mark dropped, line endings kept
as written); a document is tokenised with the tokenizer's special tokens (a BOS, say), as the
teacher saw text in training. A document of no tokens (an empty file) is left out and counted
in the set's provenance. The tokenizer's record (path, SHA-256, files) goes into the set's
`dataset.tokenizer` metadata.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from softlabels.errors import DataError, SpecError
from softlabels.safe_read import read_input
from softlabels.sources.chat import render_chats
from softlabels.sources.token_files import read_jsonl
from softlabels.sources.tokenizers import load_tokenizer
from softlabels.sources.tokens import Origin, TokenSequences
from softlabels.sources.windows import window_options, windowed

log = logging.getLogger(__name__)

TEXT_OPTIONS = ("tokenizer", "max_length", "stride", "field", "chat", "mask")
BATCH = 256  # documents tokenised at a time


def text_files(directory: Path) -> list[Path]:
    """Every *.txt file under `directory`, in sorted relative-path order; links to folders are
    not followed (a link to a file is read); anything else than a regular file is refused."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        found += [Path(root) / f for f in files if f.endswith(".txt")]
    for path in found:  # a device or a pipe (or a link to one) would be read without end
        if not path.is_file():
            raise DataError(f"{path} is not a regular file (a device, a pipe, or a link to "
                            "one or to nothing); remove it from the corpus folder")
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def _read_text(path: Path) -> str:
    try:
        return read_input(path, "text").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to "
                        "UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


def _documents(path: Path, options: dict[str, Any], spec: str) -> tuple[list[Any], Origin]:
    """(the documents or conversations, where each came from)."""
    field, chat = options.get("field"), options.get("chat")
    if path.is_dir():
        if chat is not None or field is not None:
            raise SpecError(f"chat= and field= read a .jsonl file, not a directory ({spec!r})")
        files = text_files(path)
        if not files:
            raise DataError(f"{path} holds no .txt file (from {spec!r})")
        return [_read_text(f) for f in files], Origin(
            tuple(str(f) for f in files), np.arange(len(files), dtype=np.int32),
            np.full(len(files), -1, np.int64), "")
    if not path.is_file():
        raise DataError(f"no such file or directory {str(path)!r} (from {spec!r})")
    if path.suffix != ".jsonl":
        if chat is not None or field is not None:
            raise SpecError(f"chat= and field= read a .jsonl file, not {path.name} ({spec!r})")
        return [_read_text(path)], Origin.of_rows(str(path), [-1], "")
    if (chat is None) == (field is None):
        raise SpecError(f"a .jsonl text: file takes chat=FIELD (one conversation a line) or "
                        f"field=FIELD (one document a line), not both or neither ({spec!r})")
    rows, lines = read_jsonl(path)
    origin = Origin.of_rows(str(path), lines, "line")
    name = str(chat if chat is not None else field)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or name not in row:
            raise DataError(f"{origin.describe(i)} has no field {name!r}; every line needs it")
        if chat is None and not isinstance(row[name], str):
            raise DataError(f"{origin.describe(i)}: field {name!r} is "
                            f"{type(row[name]).__name__}, expected a string of text")
    return [row[name] for row in rows], origin


def _tokenize(tokenizer: Any, documents: list[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for i in range(0, len(documents), BATCH):  # the fast tokenizer's threads per batch
        ids += tokenizer(documents[i:i + BATCH], add_special_tokens=True,
                         verbose=False)["input_ids"]
    return ids


def load_text(body: str, options: dict[str, Any], spec: str) -> TokenSequences:
    """The token sequences a `text:PATH?tokenizer=..` spec names (module docstring)."""
    unknown = set(options) - set(TEXT_OPTIONS)
    if unknown:
        raise SpecError(f"unknown text options {sorted(unknown)} in {spec!r}; use "
                        + ", ".join(TEXT_OPTIONS))
    if options.get("tokenizer") in (None, ""):
        raise SpecError(f"{spec!r} names no tokenizer; add tokenizer=DIR (the teacher's "
                        "save_pretrained directory, or its tokenizer.json)")
    if options.get("mask") is not None and options.get("chat") is None:
        raise SpecError(f"mask= applies to chat files (chat=FIELD) in {spec!r}")
    cut = window_options(options, spec)
    tokenizer, record = load_tokenizer(str(options["tokenizer"]), spec)
    documents, origin = _documents(Path(body), options, spec)
    masks, provenance = None, {"tokenizer": record, "documents": len(documents)}
    if options.get("chat") is not None:
        mask = str(options.get("mask", "all"))
        ids, masks, method = render_chats(tokenizer, documents, origin, mask=mask, spec=spec)
        provenance["chat"] = {"field": str(options["chat"]), "mask": mask,
                              "assistant_tokens": method if mask == "assistant" else None}
    else:
        ids = _tokenize(tokenizer, documents)
    keep = np.flatnonzero([len(x) > 0 for x in ids])
    if len(keep) < len(ids):
        provenance["empty_documents"] = len(ids) - len(keep)
        log.warning("%d document(s) of %s hold no tokens and are left out (first: %s)",
                    len(ids) - len(keep), body,
                    origin.describe(int(np.setdiff1d(np.arange(len(ids)), keep)[0])))
        if not len(keep):
            raise DataError(f"{body} holds no text: every document tokenises to no tokens")
        ids = [ids[i] for i in keep]
        masks = None if masks is None else [masks[i] for i in keep]
        origin = Origin(origin.files, origin.file[keep], origin.item[keep], origin.unit)
    data = TokenSequences(ids, masks=masks, where=body, origin=origin)
    data.provenance = provenance
    return windowed(data, *cut) if cut else data

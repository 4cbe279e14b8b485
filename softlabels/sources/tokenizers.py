"""A language-model teacher's own tokenizer, from local files: loaded without downloading or
running code from its directory, and identified by a SHA-256 recorded in a set's provenance.

    FILE.json    a `tokenizers` tokenizer.json (PreTrainedTokenizerFast; no chat template)
    DIR          a directory written by `save_pretrained` (AutoTokenizer, local_files_only,
                 trust_remote_code=False)

The hash (docs/TEXT.md, "The tokenizer's hash"): for a file, the SHA-256 of its bytes; for a
directory, the SHA-256 of the lines `sha256sum` prints for its tokenizer files (TOKENIZER_FILES
at the top, and every file under additional_chat_templates/) in sorted path order, i.e.
`(cd DIR && sha256sum $(ls FILES | sort)) | sha256sum`. Each file's own SHA-256 is recorded too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from softlabels.errors import DataError, SpecError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "merges.txt", "sentencepiece.bpe.model", "special_tokens_map.json",
                   "spiece.model", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "vocab.json", "vocab.txt")
TEMPLATES_DIR = "additional_chat_templates"
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_files(directory: Path) -> list[str]:
    """The tokenizer files of a save_pretrained directory, as sorted relative POSIX paths."""
    names = [n for n in TOKENIZER_FILES if (directory / n).exists()]
    templates = directory / TEMPLATES_DIR
    if templates.is_dir():
        names += [f"{TEMPLATES_DIR}/{p.name}" for p in templates.iterdir()]
    for name in names:  # a fifo or a device would be left out of the record, not refused
        if not (directory / name).is_file():
            raise DataError(f"{directory / name} is not a regular file (a fifo, a device, a "
                            "folder or a link to one); a tokenizer directory holds the files "
                            "save_pretrained writes")
    return sorted(names)


def tokenizer_record(path: str | Path) -> dict[str, Any]:
    """{'path', 'sha256', 'files': {relative path: SHA-256}} of a tokenizer file or directory
    (module docstring)."""
    path = Path(path)
    if path.is_file():
        sha = _file_sha256(path)
        return {"path": str(path), "sha256": sha, "files": {path.name: sha}}
    files = {name: _file_sha256(path / name) for name in tokenizer_files(path)}
    listing = "".join(f"{sha}  {name}\n" for name, sha in files.items())
    return {"path": str(path), "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "files": files}


def load_tokenizer(path: str, spec: str) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, its record) for a tokenizer.json file or a save_pretrained directory."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SpecError(f"{spec!r} needs transformers and tokenizers: "
                        "pip install 'softlabels[hf]'") from None
    where = Path(path)
    if where.is_dir() and not tokenizer_files(where):
        raise SpecError(f"tokenizer directory {path!r} (from {spec!r}) holds no tokenizer "
                        f"files ({', '.join(TOKENIZER_FILES[7:10])}, ...); save the teacher's "
                        "tokenizer there with save_pretrained (nothing is downloaded)")
    if not where.exists():
        raise SpecError(f"no tokenizer at {path!r} (from {spec!r}); give tokenizer= a local "
                        "tokenizer.json or save_pretrained directory (nothing is downloaded)")
    if where.is_dir():
        _check_directory(where, path, spec)
    record = tokenizer_record(where)  # before loading: what is recorded is what was read
    hf_logging.disable_progress_bar()
    try:
        if where.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(where))
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True,
                                                      trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 (tokenizers and transformers raise many types)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"cannot load the tokenizer {path!r} (from {spec!r}): {first}; give "
                        "a tokenizer.json or a save_pretrained directory that loads without "
                        "remote code") from None
    log.info("tokenizer %s: %d tokens, sha256 %s", path, len(tokenizer), record["sha256"])
    return tokenizer, record


def _check_directory(where: Path, path: str, spec: str) -> None:
    """Refuse a directory whose tokenizer needs its own code (transformers would ignore its
    auto_map and quietly build another tokenizer), or that holds no vocabulary (transformers
    would build an empty one from the model's config)."""
    config = where / "tokenizer_config.json"
    if config.is_file():
        try:
            auto_map = json.loads(config.read_bytes()).get("auto_map")
        except (ValueError, AttributeError):
            raise SpecError(f"{config} (from {spec!r}) is not a JSON object; save the "
                            "tokenizer again with save_pretrained") from None
        if auto_map:
            raise SpecError(f"the tokenizer {path!r} (from {spec!r}) asks for its own code "
                            f"(auto_map in tokenizer_config.json); softlabels runs no code from "
                            "files: save it with a tokenizer class transformers has, e.g. "
                            "tokenizer.backend_tokenizer.save('tokenizer.json'), and pass that")
    if not any((where / name).is_file() for name in VOCABULARY_FILES):
        raise SpecError(f"tokenizer directory {path!r} (from {spec!r}) holds no vocabulary "
                        f"({', '.join(VOCABULARY_FILES)}); save the teacher's tokenizer there "
                        "with save_pretrained (nothing is downloaded)")

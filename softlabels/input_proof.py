"""Inputs proven on every resume: digests of the files a run or a set operation reads.

A run that resumes (training after a kill, a set operation into an object store) records what
it read; a rerun whose inputs differ is refused instead of mixing two inputs into one result.
A local file is proven by the SHA-256 of its bytes; a local folder (an image folder, a
torchvision root) by the SHA-256 of its listing (every file's relative path, size and
modification time, in order), which changes when a file is added, removed or rewritten
without reading every image; anything else (a URL, a `python:` factory) by its spec alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from softlabels.safe_read import open_input

__all__ = ["file_digest", "folder_digest", "input_digests", "spec_path"]

_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """'sha256:<hex>' of a file's bytes."""
    h = hashlib.sha256()
    with open_input(path, "input") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def folder_digest(path: str | os.PathLike[str]) -> str:
    """'listing:<hex>': SHA-256 over every file's relative path, size and mtime (ns)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode())
    return f"listing:{h.hexdigest()}"


def spec_path(spec: str) -> Path | None:
    """The local file or folder a DATA spec reads (`npz:PATH`, `tokens:PATH?...`,
    `imagefolder:DIR`, `mnist:ROOT`), or None (a URL, a `python:` factory, no such path)."""
    if "://" in spec or spec.startswith("python:"):
        return None
    body = spec.split(":", 1)[1] if ":" in spec else spec
    body = body.split("?", 1)[0]
    path = Path(body)
    return path if body and path.exists() else None


def _digest(path: Path) -> str:
    return folder_digest(path) if path.is_dir() else file_digest(path)


def input_digests(data: Any, **files: str | os.PathLike[str] | None) -> dict[str, str | None]:
    """{'data': digest of the DATA spec's file or folder, name: digest of each named file}
    (None where there is nothing local to read)."""
    path = spec_path(data) if isinstance(data, str) else None
    found: dict[str, str | None] = {"data": _digest(path) if path is not None else None}
    for name, given in files.items():
        found[name] = (_digest(Path(given)) if given is not None and Path(given).exists()
                       else None)
    return found

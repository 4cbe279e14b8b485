"""Packaging that resolves: every dependency and extra in pyproject.toml has a lower bound,
and each installed backend meets its bound (a resolver once picked s3fs 0.4.2 for `.[dev]`)."""

from __future__ import annotations

import importlib
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# extra -> the module its backend is imported as
BACKENDS = {"s3": ["s3fs"], "gcs": ["gcsfs"], "http": ["aiohttp", "fsspec"],
            "hf": ["transformers", "safetensors"], "tokens": ["pyarrow", "datasets"],
            "zarrs": ["zarrs"]}


def _requirements() -> list[str]:
    extras = [r for reqs in PROJECT["optional-dependencies"].values() for r in reqs]
    return PROJECT["dependencies"] + extras


def _bound(requirement: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(?:>=\s*([0-9][^,;\s]*))?.*",
                     requirement)
    assert m, requirement
    return m.group(1).lower(), m.group(2)


def _as_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@pytest.mark.parametrize("requirement", _requirements())
def test_every_dependency_has_a_lower_bound(requirement: str) -> None:
    name, low = _bound(requirement)
    assert low is not None, f"{requirement}: give it a lower bound (name>=X.Y)"


def test_every_extra_has_its_backend_listed() -> None:
    assert set(BACKENDS) <= set(PROJECT["optional-dependencies"])


@pytest.mark.parametrize("extra", sorted(BACKENDS))
def test_each_extras_backend_imports_and_meets_its_bound(extra: str) -> None:
    bounds = dict(_bound(r) for r in PROJECT["optional-dependencies"][extra])
    for module in BACKENDS[extra]:
        try:
            importlib.import_module(module)
            installed = version(module)
        except (ImportError, PackageNotFoundError):
            pytest.skip(f"the {extra} extra is not installed here ({module})")
        low = bounds.get(module.lower())
        assert low is not None, f"{extra}: {module} has no bound"
        assert _as_tuple(installed) >= _as_tuple(low), (
            f"{module} {installed} is older than the bound {low} in the {extra} extra")

"""The progress callback the library accepts; the command line turns it into a tqdm bar."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]  # (units done, units in all)

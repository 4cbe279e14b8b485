"""`within`: run work that might wait for ever (opening a fifo waits for a writer) in a
daemon thread, and fail the test if it is still waiting after a deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """`work()`'s result or the exception it raised; fails the test if it is still waiting."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert "value" in done, f"still waiting after {seconds} s (on a fifo?)"
    return done["value"]

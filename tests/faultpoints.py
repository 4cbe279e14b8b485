"""Run the softlabels CLI and SIGKILL it at a chosen point of the code.

    python faultpoints.py MODULE:OWNER.ATTR N before|after -- CLI ARGS...

kills the process on the Nth call of MODULE.OWNER.ATTR (or MODULE.ATTR), before or after that
call runs. The kill is real (SIGKILL: no clean-up handler, no finally block runs), so a test can
put a writer's death at an exact step instead of racing a timer.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any


def arm(target: str, n: int, when: str) -> None:
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *owners, attr = path.split(".")
    for name in owners:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attr, wrapper)


if __name__ == "__main__":
    target, n, when, sep, *cli_args = sys.argv[1:]
    assert sep == "--" and when in ("before", "after")
    arm(target, int(n), when)
    from softlabels.cli import cli

    cli.main(cli_args, prog_name="softlabels")

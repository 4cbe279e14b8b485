"""The `softlabels` command's entry point (`python -m softlabels`, the console script).

Light on purpose: it installs the Ctrl-C handling before anything heavy is imported, so an
interrupt at any point -- while torch is being imported, while a command runs -- ends in one
line ("interrupted") and exit status 130 (128 + SIGINT), never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

INTERRUPTED = 130  # the shells' status for a process ended by SIGINT
TERMINATED = 143  # ... and by SIGTERM (128 + 15)


def interrupted() -> None:
    """Say so in one line and leave with status 130."""
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the status says it
        pass


def _during_start_up(signum: int, frame: FrameType | None) -> None:
    # Raised inside whatever import is running; SystemExit unwinds it without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while unwinding: ignored
    interrupted()
    raise SystemExit(INTERRUPTED)


def _terminate_cleanly(pid: int) -> None:
    """SIGTERM (a scheduler, `kill`, a container stop) unwinds like an error: the command's
    `finally` blocks run, so its writer lease (`OUT.lock`) is released and removed and its
    temporaries cleaned, where the default action left them behind. A child process forked
    from this one (a DataLoader worker) keeps the default action."""

    def terminated(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != pid:  # a forked child: die as it would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the unwinding is under way
        try:
            sys.stderr.write("terminated\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        raise SystemExit(TERMINATED)

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminated)


def main() -> None:
    """Run the command line; Ctrl-C anywhere is one line and status 130."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored by a parent
        signal.signal(signal.SIGINT, _during_start_up)
    try:
        from softlabels.cli import main as cli_main  # imports click, the commands, torch
    finally:
        if signal.getsignal(signal.SIGINT) is _during_start_up:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    _terminate_cleanly(os.getpid())
    try:
        cli_main()  # turns a KeyboardInterrupt inside a command into "interrupted", 130
    except KeyboardInterrupt:  # between the two: after start-up, before click took over
        interrupted()
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()

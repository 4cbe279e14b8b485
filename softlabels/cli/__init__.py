"""The command line: a thin click layer. Parse, call one library function, echo a summary.

Library errors become one-line messages here, in one place (`_Group.main`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any

import click

from softlabels.errors import SoftlabelsError
from softlabels.redact import RedactingFilter, redact

INTERRUPTED = 130  # the shells' status for a process ended by SIGINT (128 + 2)


class _Interrupted(Exception):
    """Ctrl-C inside a command (click would otherwise call it "Aborted!")."""


class _Group(click.Group):
    """A group whose every error, click's or the library's, ends in one line and exit 1/2;
    Ctrl-C ends in the line "interrupted" and status 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted() from exc

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name or "softlabels", complete_var, False, **extra)
        except _Interrupted:
            _interrupted()
        except click.exceptions.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):  # while click parsed the options
                _interrupted()
            _error("aborted")
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            _error(f"{exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except SoftlabelsError as exc:
            _error(str(exc))
            sys.exit(1)
        except FileExistsError as exc:  # e.g. --out names an ordinary file
            _error(f"{exc.filename} already exists and is not what this command writes; "
                   "choose another path")
            sys.exit(1)
        except OSError as exc:  # the filesystem refused: a path under a file, read-only, ...
            where = f" {exc.filename}" if exc.filename else ""
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                _error(f"cannot write{where}: {exc.strerror or exc}; free space on that disk "
                       "(or raise the quota), or write elsewhere")
            else:
                _error(f"cannot use{where}: {exc.strerror or exc}; check the path and its "
                       "permissions")
            sys.exit(1)
        except MemoryError:  # an input larger than this machine's memory (a 4 GiB document)
            _error("out of memory: an input is larger than this machine can hold; check the "
                   "paths given, or split the input")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _interrupted() -> None:
    click.echo("interrupted", err=True)
    sys.exit(INTERRUPTED)


def _error(message: str) -> None:
    """The one line every failure ends in, URL credentials redacted."""
    click.echo(f"Error: {redact(message)}", err=True)


@click.group(cls=_Group)
@click.version_option(package_name="softlabels")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Deadline of each network request (object stores, web "
              "servers, a Dask scheduler) [default: $SOFTLABELS_TIMEOUT or 60].")
def cli(verbose: bool, timeout: float | None) -> None:
    """Offline knowledge distillation: run a teacher once, store its soft targets in a
    transfer set, train many students from them."""
    if timeout is not None:  # through the environment: DataLoader and Dask workers see it too
        os.environ["SOFTLABELS_TIMEOUT"] = f"{timeout:g}"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # no URL credentials in any log line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    # zarr's chunk reads still pending when a damaged chunk ended a read are destroyed with its
    # event loop at exit; the damage was already said in one line
    logging.getLogger("asyncio").addFilter(_no_destroyed_tasks)


def _no_destroyed_tasks(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Task was destroyed but it is pending")


def main() -> None:
    """The console entry point (see softlabels/__main__.py for the one that also covers
    Ctrl-C while the commands are being imported)."""
    try:
        cli()
    except KeyboardInterrupt:  # outside click's own handling, e.g. while it exits
        _interrupted()



def _register() -> None:
    from softlabels.cli import interchange, precompute, run, sets, train

    for command in (precompute.precompute, sets.info, sets.verify, sets.merge, sets.subset,
                    sets.convert, sets.report, train.train, train.evaluate, run.run_cmd,
                    interchange.export_cmd, interchange.import_cmd):
        cli.add_command(command)


_register()

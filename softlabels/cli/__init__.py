"""The command line: a thin click layer. Parse, call one library function, echo a summary.

Library errors become one-line messages here, in one place (`_Group.main`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..errors import SoftlabelsError


class _Group(click.Group):
    """A group whose every error, click's or the library's, ends in one line and exit 1/2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name or "softlabels", complete_var, False, **extra)
        except click.exceptions.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except SoftlabelsError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except FileExistsError as exc:  # e.g. --out names an ordinary file
            click.echo(f"Error: {exc.filename} already exists and is not what this command "
                       "writes; choose another path", err=True)
            sys.exit(1)
        except OSError as exc:  # the filesystem refused: a path under a file, read-only, ...
            where = f" {exc.filename}" if exc.filename else ""
            click.echo(f"Error: cannot use{where}: {exc.strerror or exc}; check the path and "
                       "its permissions", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group)
@click.version_option(package_name="softlabels")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def cli(verbose: bool) -> None:
    """Offline knowledge distillation: run a teacher once, store its soft targets in a
    transfer set, train many students from them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli()



def _register() -> None:
    from . import interchange, precompute, run, sets, train

    for command in (precompute.precompute, sets.info, sets.verify, sets.merge, sets.subset,
                    sets.convert, sets.report, train.train, train.evaluate, run.run_cmd,
                    interchange.export_cmd, interchange.import_cmd):
        cli.add_command(command)


_register()

"""The command line: a thin click layer. Parse, call one library function, echo a summary.

Library errors become one-line messages here, in one place (`_Group.main`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from .errors import SoftlabelsError


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
        sys.exit(code if isinstance(code, int) else 0)


class FloatList(click.ParamType):
    """A comma-separated list of numbers, e.g. 1,4,20."""

    name = "T1,T2,.."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[float]:
        if isinstance(value, list):
            return value
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers (e.g. 1,4,20)",
                      param, ctx)


class IntList(click.ParamType):
    name = "N1,N2,.."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers (e.g. 0,1,2)",
                      param, ctx)


@contextmanager
def progress_bar(desc: str, unit: str = "row") -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr driven by the library's (done, total) callback."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               disable=None)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
            bar.update(done)
        else:
            bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, default=str))


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


# --- stage one --------------------------------------------------------------------------------


@cli.command()
@click.option("--data", required=True, help="DATA spec, e.g. mnist:data?split=train or npz:x.npz")
@click.option("--teacher", "teachers", multiple=True, required=True,
              help="MODEL spec or checkpoint; repeat for an ensemble.")
@click.option("--out", required=True, help="Transfer set to write: DIR.zarr (default) or FILE.h5.")
@click.option("--temperatures", type=FloatList(), default="1", show_default=True,
              help="Temperatures at which to store probabilities.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of logits.")
@click.option("--probs-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Storage dtype of probabilities (float16 underflows).")
@click.option("--combine", type=click.Choice(["mean-logits", "mean-probs"]),
              default="mean-logits", show_default=True, help="How ensemble members combine.")
@click.option("--keep-members", is_flag=True, help="Also store each member's logits.")
@click.option("--chunk-rows", type=int, default=0, help="Rows per chunk (default: ~1 MiB).")
@click.option("--shard-rows", type=int, default=None, help="Rows per Zarr shard (optional).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="Autocast precision of the teacher.")
@click.option("--num-workers", type=int, default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing set made by another run.")
def precompute(data: str, teachers: tuple[str, ...], out: str, temperatures: list[float],
               batch_size: int, dtype: str, probs_dtype: str, combine: str, keep_members: bool,
               chunk_rows: int, shard_rows: int | None, device: str, precision: str,
               num_workers: int, overwrite: bool) -> None:
    """Run the teacher(s) once over DATA and write their soft targets to a transfer set."""
    from .precompute import precompute as run

    with progress_bar("precompute") as bar:
        result = run(data, list(teachers), out, temperatures=temperatures, batch_size=batch_size,
                     dtype=dtype, probs_dtype=probs_dtype, combine=combine,
                     keep_members=keep_members, chunk_rows=chunk_rows, shard_rows=shard_rows,
                     device=device, precision=precision, num_workers=num_workers,
                     overwrite=overwrite, progress=bar)
    if result.already_complete:
        click.echo(f"{out} is already complete ({result.num_rows} rows); nothing to do")
    else:
        how = "resumed, " if result.resumed else ""
        click.echo(f"wrote {out}: {result.num_rows} rows x {result.meta['num_classes']} classes "
                   f"at T={','.join(f'{t:g}' for t in result.meta['temperatures'])} "
                   f"({how}{result.rows_computed} computed in {result.seconds:.1f}s)")


@cli.command()
@click.argument("transfer_set")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(transfer_set: str, as_json: bool) -> None:
    """Describe a transfer set: provenance, arrays, size."""
    from .transfer_set import open_transfer_set

    with open_transfer_set(transfer_set) as ts:
        summary = ts.summary()
    if as_json:
        echo_json(summary)
        return
    teacher = summary["teacher"]
    lines = [
        f"{summary['path']}  ({summary['backend']}, {summary['bytes'] / 2**20:.2f} MiB, "
        f"format v{summary['format_version']}, {summary['status']})",
        f"rows {summary['num_rows']} of {summary['num_examples']} examples, "
        f"{summary['num_classes']} classes, T = {summary['temperatures']}",
        f"teacher ({teacher['combine']}):",
        *[f"  {m['spec']}  sha256 {m['sha256'][:16]}…" for m in teacher["members"]],
        f"dataset {summary['dataset']['spec']}  fingerprint "
        f"{summary['dataset']['fingerprint'][:16]}…",
        f"made {summary.get('created_at')} on {summary.get('device')} ({summary.get('precision')}),"
        f" " + ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items()),
        "arrays:",
        *[f"  {n:14s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} chunks {tuple(a['chunks'])}"
          for n, a in summary["arrays"].items()],
    ]
    click.echo("\n".join(lines))


@cli.command()
@click.argument("transfer_set")
@click.option("--data", default=None, help="Check every sample hash against this DATA.")
@click.option("--teacher", "teachers", multiple=True,
              help="Recompute sampled rows with this live teacher (repeat for an ensemble).")
@click.option("--sample", type=int, default=64, show_default=True,
              help="Rows to recompute with --teacher.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tolerance", type=float, default=None,
              help="Largest relative logit difference accepted (default by dtype/precision).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(transfer_set: str, data: str | None, teachers: tuple[str, ...], sample: int,
           seed: int, tolerance: float | None, device: str, as_json: bool) -> None:
    """Check a transfer set: status, shapes, values, fingerprint, and optionally data/teacher."""
    from .verify import verify as run

    with progress_bar("verify") as bar:
        report = run(transfer_set, data=data, teachers=list(teachers), sample=sample, seed=seed,
                     tolerance=tolerance, device=device, progress=bar)
    if as_json:
        echo_json(report.to_dict())
    else:
        for c in report.checks:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        click.echo("verified" if report.ok else "verification FAILED")
    if not report.ok:
        sys.exit(1)

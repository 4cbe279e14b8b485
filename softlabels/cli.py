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
@click.option("--store-inputs", is_flag=True,
              help="Also store the preprocessed inputs: DATA `transferset:SET` then trains "
                   "from the set alone.")
@click.option("--topk", type=int, default=0,
              help="Store only the K largest logits and per-T normalisers (sparse).")
@click.option("--sample-k", type=int, default=0,
              help="Store K classes drawn from each p_T instead (sparse, unbiased).")
@click.option("--views", type=int, default=0,
              help="Store V augmented views per example (with --augment).")
@click.option("--augment", default=None,
              help="Views' augmentation, e.g. random-crop:2,hflip (see docs/FORMAT.md).")
@click.option("--view-seed", type=int, default=0, show_default=True,
              help="Base seed of the views.")
@click.option("--chunk-rows", type=int, default=0, help="Rows per chunk (default: ~1 MiB).")
@click.option("--shard-rows", type=int, default=None, help="Rows per Zarr shard (optional).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True, help="Autocast precision of the teacher.")
@click.option("--num-workers", type=int, default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing set made by another run.")
@click.option("--workers", type=int, default=None,
              help="Spread blocks over a local Dask cluster of N single-threaded processes.")
@click.option("--scheduler", default=None, help="Use the running Dask cluster at ADDRESS.")
def precompute(data: str, teachers: tuple[str, ...], out: str, temperatures: list[float],
               batch_size: int, dtype: str, probs_dtype: str, combine: str, keep_members: bool,
               store_inputs: bool, topk: int, sample_k: int, views: int,
               augment: str | None, view_seed: int, chunk_rows: int,
               shard_rows: int | None, device: str,
               precision: str,
               num_workers: int, overwrite: bool, workers: int | None,
               scheduler: str | None) -> None:
    """Run the teacher(s) once over DATA and write their soft targets to a transfer set."""
    options = dict(temperatures=temperatures, batch_size=batch_size, dtype=dtype,
                   probs_dtype=probs_dtype, combine=combine, keep_members=keep_members,
                   store_inputs=store_inputs, topk=topk, sample_k=sample_k, views=views,
                   augment=augment, view_seed=view_seed,
                   chunk_rows=chunk_rows, shard_rows=shard_rows,
                   device=device, precision=precision, overwrite=overwrite)
    with progress_bar("precompute") as bar:
        if workers is not None or scheduler is not None:
            from .distributed import precompute_on_cluster

            result = precompute_on_cluster(data, list(teachers), out, workers=workers,
                                           scheduler=scheduler, progress=bar, **options)
        else:
            from .precompute import precompute as run

            result = run(data, list(teachers), out, num_workers=num_workers, progress=bar,
                         **options)
    if result.already_complete:
        click.echo(f"{out} is already complete ({result.num_rows} rows); nothing to do")
    else:
        how = "resumed, " if result.resumed else ""
        click.echo(f"wrote {out}: {result.num_rows} rows x {result.meta['num_classes']} classes "
                   f"at T={','.join(f'{t:g}' for t in result.meta['temperatures'])} "
                   f"({how}{result.rows_computed} computed in {result.seconds:.1f}s)")


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    """Where a set came from, if it was cut, merged or converted from others."""
    lines = []
    for what, src in (("subset of", prov.get("subset_of")),
                      ("converted from", prov.get("converted_from"))):
        if src:
            lines.append(f"{what} {src['path']} (fingerprint {src['fingerprint'][:16]}…)")
    for src in prov.get("merged_from") or []:
        lines.append(f"merged from {src['path']} (teacher sha256 "
                     + ", ".join(h[:12] for h in src["teacher"]) + ")")
    return lines


@cli.command()
@click.argument("transfer_set")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--stats", is_flag=True,
              help="Also compute per-class mass, entropy per T and teacher accuracy (dask).")
def info(transfer_set: str, as_json: bool, stats: bool) -> None:
    """Describe a transfer set: provenance, arrays, size."""
    from .transfer_set import open_transfer_set

    with open_transfer_set(transfer_set) as ts:
        summary = ts.summary()
        if stats:
            summary["stats"] = ts.stats()
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
        *[f"  {m.get('source', m['spec'])}  ({m['spec']})  sha256 {m['sha256'][:16]}…"
          for m in teacher["members"]],
        f"dataset {summary['dataset']['spec']}  fingerprint "
        f"{summary['dataset']['fingerprint'][:16]}…",
        f"made {summary.get('created_at')} on {summary.get('device')} ({summary.get('precision')}),"
        f" " + ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items()),
        *provenance_lines(summary.get("provenance") or {}),
        "arrays:",
        *[f"  {n:14s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} chunks {tuple(a['chunks'])}"
          for n, a in summary["arrays"].items()],
    ]
    if stats:
        st = summary["stats"]
        acc = st["teacher_accuracy"]
        lines += [f"teacher accuracy on {st['labelled_rows']} labelled rows: "
                  + (f"{acc:.4f}" if acc is not None else "n/a"),
                  "mean entropy (nats) per T: " + ", ".join(f"T={t}: {e:.4f}" for t, e in
                                                            st["mean_entropy"].items())]
        for t, mass in st["class_mass"].items():
            lines.append(f"class mass at T={t}: " + " ".join(f"{m:.3f}" for m in mass))
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


# --- sharing ----------------------------------------------------------------------------------


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, help="The merged set to write.")
@click.option("--combine", type=click.Choice(["mean-logits", "mean-probs"]),
              default="mean-logits", show_default=True)
def merge(sources: tuple[str, ...], out: str, combine: str) -> None:
    """Merge sets of the same data made by different teachers into one ensemble set."""
    from .sharing import merge as run

    with progress_bar("merge") as bar:
        meta = run(list(sources), out, combine=combine, progress=bar)
    click.echo(f"wrote {out}: {meta['num_rows']} rows, ensemble of "
               f"{len(meta['teacher']['members'])} members ({combine})")


@cli.command()
@click.argument("source")
@click.option("--out", required=True, help="The new, smaller set.")
@click.option("--fraction", type=float, default=None, help="Seeded stratified fraction, (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", type=IntList(), default=None, help="Keep only these classes.")
@click.option("--exclude-classes", type=IntList(), default=None, help="Drop these classes.")
@click.option("--indices", default=None, help="File of dataset indices to keep (.txt or .npy).")
def subset(source: str, out: str, fraction: float | None, seed: int, classes: list[int] | None,
           exclude_classes: list[int] | None, indices: str | None) -> None:
    """Cut a set down to selected rows; its provenance names the source."""
    from .sharing import subset as run

    with progress_bar("subset") as bar:
        meta = run(source, out, fraction=fraction, seed=seed, classes=classes,
                   exclude_classes=exclude_classes, indices=indices, progress=bar)
    click.echo(f"wrote {out}: {meta['num_rows']} rows selected from {source}")


@cli.command()
@click.argument("source")
@click.option("--out", required=True, help="Target: DIR.zarr, FILE.h5 or FILE.zarr.zip.")
def convert(source: str, out: str) -> None:
    """Copy a set between Zarr, HDF5 and zip-packed Zarr, content identical."""
    from .sharing import convert as run

    with progress_bar("convert") as bar:
        meta = run(source, out, progress=bar)
    click.echo(f"wrote {out}: {meta['num_rows']} rows, same content as {source}")


@cli.command()
@click.argument("transfer_set")
@click.option("--out", required=True, help="Directory for the PNG plots and summary.md.")
def report(transfer_set: str, out: str) -> None:
    """Plots and a provenance summary to read before using someone else's set."""
    from .plots import transfer_set_report

    transfer_set_report(transfer_set, out)
    click.echo(f"wrote {out}/summary.md, confidence_entropy.png, class_mass.png")


# --- stage two --------------------------------------------------------------------------------


def epoch_bars() -> Callable[[str, dict[str, Any]], None]:
    """A trainer callback drawing one tqdm bar per epoch with the running loss (and accuracy)."""
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def callback(event: str, info: dict[str, Any]) -> None:
        if event == "batch":
            if state["bar"] is None:
                state["bar"] = tqdm(total=info["batches"], desc=f"epoch {info['epoch'] + 1}",
                                    unit="batch", file=sys.stderr, leave=False, disable=None)
            state["bar"].set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
            state["bar"].update(1)
        elif state["bar"] is not None:
            bar, state["bar"] = state["bar"], None
            bar.close()
            acc = f"  val_accuracy {info['val_accuracy']:.4f}" if "val_accuracy" in info else ""
            logging.getLogger("softlabels.train").info(
                "epoch %d/%d  loss %.4f%s", info["epoch"], info["epochs"], info["loss"], acc)
            if bar.disable is False:
                tqdm.write(f"epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f}{acc}",
                           file=sys.stderr)

    return callback


@cli.command()
@click.option("--data", required=True, help="DATA spec of the training inputs.")
@click.option("--model", required=True, help="MODEL spec of the student (or a checkpoint).")
@click.option("--out", required=True, help="Checkpoint to write (a MODEL spec for later use).")
@click.option("--transfer-set", default=None, help="Train from these stored soft targets.")
@click.option("--temperature", type=float, default=None,
              help="Distillation T (default: the set's first stored T).")
@click.option("--alpha", type=float, default=0.9, show_default=True,
              help="Weight of the soft term; 1 - alpha weighs the hard labels.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam",
              show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fraction", type=float, default=None, help="Seeded stratified subset, (0, 1].")
@click.option("--classes", type=IntList(), default=None, help="Keep only these classes.")
@click.option("--exclude-classes", type=IntList(), default=None, help="Drop these classes.")
@click.option("--indices", default=None, help="File of dataset indices to keep (.txt or .npy).")
@click.option("--val-data", default=None, help="DATA spec to report accuracy on each epoch.")
@click.option("--jitter", type=int, default=0, show_default=True,
              help="Shift training images by up to this many pixels.")
@click.option("--device", default="auto", show_default=True)
@click.option("--distributed", is_flag=True,
              help="Data-parallel across the ranks torchrun starts (gloo on CPU).")
@click.option("--views-per-epoch", type=int, default=1, show_default=True,
              help="From a view set: stored views of each example per epoch.")
def train(data: str, model: str, out: str, transfer_set: str | None, temperature: float | None,
          alpha: float, epochs: int, batch_size: int, lr: float, optimizer: str,
          weight_decay: float, seed: int, fraction: float | None, classes: list[int] | None,
          exclude_classes: list[int] | None, indices: str | None, val_data: str | None,
          jitter: int, device: str, distributed: bool, views_per_epoch: int) -> None:
    """Train a student from a transfer set's soft targets, or from hard labels without one."""
    from .trainer import train_student

    result = train_student(data, model, out=out, transfer_set=transfer_set,
                           temperature=temperature, alpha=alpha, epochs=epochs,
                           batch_size=batch_size, lr=lr, optimizer=optimizer,
                           weight_decay=weight_decay, seed=seed, fraction=fraction,
                           classes=classes, exclude_classes=exclude_classes, indices=indices,
                           val_data=val_data, jitter_pixels=jitter, device=device,
                           distributed=distributed, views_per_epoch=views_per_epoch,
                           callbacks=[epoch_bars()])
    if result.rank != 0:
        return  # rank 0 wrote the checkpoint and reports
    last = result.history[-1]
    acc = f", val_accuracy {last['val_accuracy']:.4f}" if "val_accuracy" in last else ""
    how = f"soft targets of {transfer_set}" if transfer_set else "hard labels"
    click.echo(f"wrote {out}: {result.spec} trained {epochs} epochs on {result.rows} rows from "
               f"{how} in {result.seconds:.1f}s (loss {last['loss']:.4f}{acc})")


def parse_bias(values: tuple[str, ...]) -> dict[int, float]:
    out = {}
    for v in values:
        k, sep, b = v.partition("=")
        try:
            out[int(k)] = float(b)
        except ValueError:
            raise click.BadParameter(f"{v!r} is not CLASS=VALUE (e.g. 3=3.5)",
                                     param_hint="--bias-adjust") from None
    return out


@cli.command()
@click.option("--data", required=True, help="DATA spec to evaluate on.")
@click.option("--model", required=True, help="Checkpoint (or MODEL spec) to evaluate.")
@click.option("--bias-adjust", multiple=True, help="CLASS=VALUE added to a class's logit bias.")
@click.option("--transfer-set", default=None,
              help="A set of the same data: report agreement with and KL to its teacher.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(data: str, model: str, bias_adjust: tuple[str, ...], transfer_set: str | None,
             device: str, as_json: bool) -> None:
    """Accuracy, errors per class, calibration, and agreement with a teacher."""
    from .evaluate import evaluate as run

    report = run(data, model, bias_adjust=parse_bias(bias_adjust), transfer_set=transfer_set,
                 device=device)
    if as_json:
        echo_json(report)
        return
    click.echo(f"accuracy {report['accuracy']:.4f}  errors {report['errors']} of {report['n']}"
               f"  ECE {report['ece']:.4f}")
    click.echo("errors per class: " + " ".join(f"{k}:{v}" for k, v in
                                               enumerate(report["per_class_errors"])))
    if "teacher_agreement" in report:
        click.echo(f"agreement with teacher {report['teacher_agreement']:.4f}  "
                   f"KL(teacher||student) {report['kl_to_teacher']:.4f}")


# --- pipelines --------------------------------------------------------------------------------


@cli.command(name="run")
@click.argument("pipeline")
@click.option("--out", default=None, help="Output directory (default: the file's `out`).")
@click.option("--quick", is_flag=True, help="The same steps, small and fast (for tests).")
def run_cmd(pipeline: str, out: str | None, quick: bool) -> None:
    """Run a pipeline file (e.g. pipelines/mnist_hinton.toml); a rerun skips finished steps."""
    from .pipeline import run_pipeline

    results = run_pipeline(pipeline, out=out, quick=quick,
                           say=lambda m: click.echo(m, err=True), callbacks=[epoch_bars()])
    where = results.get("out_dir", "")
    click.echo(f"results: {where}results.json, results.md and PNG plots "
               f"({results['seconds_this_run']} s this run)")

"""The set tools: info, verify, merge, subset, convert, report."""

from __future__ import annotations

import sys
from typing import Any

import click

from softlabels.cli._common import (
    TRUST_CODE_HELP,
    IntList,
    echo,
    echo_json,
    progress_bar,
    provenance_lines,
)
from softlabels.errors import SoftlabelsError
from softlabels.format.info import DatasetInfo, Member, SetInfo
from softlabels.format.layout import Layout
from softlabels.format.schema import COMBINE_CHOICES
from softlabels.format.statistics import set_statistics
from softlabels.options import MAX_TEACHER_BYTES_HELP, parse_bytes
from softlabels.preprocessing import describe


@click.command()
@click.argument("transfer_set")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--stats", is_flag=True,
              help="Also compute per-class mass, entropy per T and teacher accuracy (dask).")
def info(transfer_set: str, as_json: bool, stats: bool) -> None:
    """Describe a transfer set: provenance, arrays, size."""
    from softlabels.format.reader import open_transfer_set

    with open_transfer_set(transfer_set) as ts:
        summary, set_info, layout = ts.summary(), ts.info, ts.layout
        seq = layout.kind == "sequences"  # rows are token positions
        if stats and seq and ts.target.sparse:
            raise SoftlabelsError(f"{ts.path} is a sparse sequence set ({ts.target.name}, "
                                  f"k = {ts.target.to_meta()['k']}): --stats reads dense "
                                  "arrays; drop "
                                  f"--stats, and check the set with `softlabels verify "
                                  f"{ts.path}`")
        if stats:
            summary["stats"] = set_statistics(ts)
    if as_json:
        echo_json(summary)
        return
    teacher, dataset = set_info.teacher, set_info.dataset
    lines = [
        f"{summary['path']}  ({summary['backend']}, "
        + ("size unknown" if summary["bytes"] is None else f"{summary['bytes'] / 2**20:.2f} MiB")
        + f", "
        f"format v{summary['format_version']}, {summary['status']})",
        _size_line(layout, set_info.num_examples),
        f"teacher ({teacher.combine}):",
        *[line for m in teacher.members for line in _member_lines(m)],
        *([f"  preprocessing applied: {describe(teacher.preprocess)}"]
          if teacher.preprocess else []),
        f"dataset {dataset.spec}  fingerprint {(dataset.fingerprint or '')[:16]}…",
        *_tokenizer_lines(dataset),
        f"made {set_info.created_at} on {set_info.device} ({set_info.precision}),"
        f" " + ", ".join(f"{k} {v}" for k, v in (set_info.versions or {}).items()),
        *provenance_lines(set_info.provenance),
        "arrays:",
        *[f"  {n:14s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} chunks {tuple(a['chunks'])}"
          for n, a in summary["arrays"].items()],
    ]
    if stats:
        st = summary["stats"]
        acc = st["teacher_accuracy"]
        what = ("accuracy on {} positions with a hard target" if seq else
                "accuracy on {} labelled rows")
        lines += [f"teacher {what.format(st['labelled_rows'])}: "
                  + (f"{acc:.4f}" if acc is not None else "n/a"),
                  f"mean entropy (nats) per {'position' if seq else 'row'} and T: "
                  + ", ".join(f"T={t}: {e:.4f}" for t, e in st["mean_entropy"].items())]
        for t, mass in st["class_mass"].items():
            if seq and len(mass) > 32:  # a vocabulary: its most probable tokens
                top = sorted(range(len(mass)), key=lambda c: -mass[c])[:10]
                lines.append(f"most probable token ids at T={t} (mean probability): "
                             + " ".join(f"{c}:{mass[c]:.3f}" for c in top))
            else:
                lines.append(f"{'mean token probability' if seq else 'class mass'} at T={t}: "
                             + " ".join(f"{m:.3f}" for m in mass))
    echo("\n".join(lines))


def _member_lines(member: Member) -> list[str]:
    """A teacher member: what was named, its state-dict hash, its weights files' SHA-256."""
    return [f"  {member.name}  ({member.spec})  sha256 {member.sha256[:16]}…"
            + ("  (untrained: random initialisation)" if member.untrained else ""),
            *([f"    weights entry {member.weights_entry}"] if member.weights_entry else []),
            *[f"    weights file {f.file}  sha256 {f.sha256}"
              for f in member.weights_sha256 or ()]]


def _size_line(layout: Layout, num_examples: int) -> str:
    """What the rows are: examples, or the positions of sequences."""
    temps = f"T = {list(layout.temperatures)}"
    if layout.kind != "sequences":
        return (f"rows {layout.num_rows} of {num_examples} examples, "
                f"{layout.num_classes} classes, {temps}")
    n, rows = layout.num_sequences, layout.num_rows
    source = f" (cut from data of {num_examples} sequences)" if num_examples != n else ""
    labels = ("the next token" if layout.sequence_labels == "next-token"
              else "the data's labels")
    return (f"{rows} positions (one row per token) of {n} sequences{source}, mean length "
            f"{rows / n:.1f} tokens; {layout.num_classes} classes (token ids); hard "
            f"targets: {labels}; {temps}")


@click.command()
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
@click.option("--trust-code", is_flag=True, help=TRUST_CODE_HELP)
@click.option("--max-teacher-bytes", default=None, metavar="SIZE", help=MAX_TEACHER_BYTES_HELP)
def verify(transfer_set: str, data: str | None, teachers: tuple[str, ...], sample: int,
           seed: int, tolerance: float | None, device: str, as_json: bool,
           trust_code: bool, max_teacher_bytes: str | None) -> None:
    """Check a transfer set: status, shapes, values, fingerprint, and optionally data/teacher."""
    from softlabels.sets.verify import verify as run

    bound = parse_bytes(max_teacher_bytes, "--max-teacher-bytes") if max_teacher_bytes else None
    with progress_bar("verify") as bar:
        report = run(transfer_set, data=data, teachers=list(teachers), sample=sample, seed=seed,
                     tolerance=tolerance, device=device, progress=bar, trust_code=trust_code,
                     max_teacher_bytes=bound)
    if as_json:
        echo_json(report.to_dict())
    else:
        for c in report.checks:
            echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        echo("verified" if report.ok else "verification FAILED")
    if not report.ok:
        sys.exit(1)


# --- sharing ----------------------------------------------------------------------------------


def _done(out: str, meta: dict[str, Any]) -> str | None:
    """The line for a rerun of a finished command (the output already holds its result)."""
    if not meta.get("already_complete"):
        return None
    return f"{out} is already complete ({meta['num_rows']} rows); nothing to do"


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", required=True, help="The merged set to write.")
@click.option("--combine", type=click.Choice(COMBINE_CHOICES),
              default="mean-logits", show_default=True)
def merge(sources: tuple[str, ...], out: str, combine: str) -> None:
    """Merge sets of the same data made by different teachers into one ensemble set."""
    from softlabels.format.operations import merge as run

    with progress_bar("merge") as bar:
        meta = run(list(sources), out, combine=combine, progress=bar)
    members = SetInfo.from_meta(meta, where=out).teacher.members
    echo(_done(out, meta) or f"wrote {out}: {meta['num_rows']} rows, ensemble of "
         f"{len(members)} members ({combine})")


@click.command()
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
    from softlabels.format.operations import subset as run

    with progress_bar("subset") as bar:
        meta = run(source, out, fraction=fraction, seed=seed, classes=classes,
                   exclude_classes=exclude_classes, indices=indices, progress=bar)
    echo(_done(out, meta) or f"wrote {out}: {meta['num_rows']} rows selected from {source}")


@click.command()
@click.argument("source")
@click.option("--out", required=True, help="Target: DIR.zarr, FILE.h5 or FILE.zarr.zip.")
def convert(source: str, out: str) -> None:
    """Copy a set between Zarr, HDF5 and zip-packed Zarr, content identical."""
    from softlabels.format.operations import convert as run

    with progress_bar("convert") as bar:
        meta = run(source, out, progress=bar)
    echo(_done(out, meta) or f"wrote {out}: {meta['num_rows']} rows, same content as {source}")


@click.command()
@click.argument("transfer_set")
@click.option("--out", required=True, help="Directory for the PNG plots and summary.md.")
def report(transfer_set: str, out: str) -> None:
    """Plots and a provenance summary to read before using someone else's set."""
    from softlabels.sets.report import transfer_set_report

    transfer_set_report(transfer_set, out)
    echo(f"wrote {out}/summary.md, confidence_entropy.png, class_mass.png")


def _tokenizer_lines(dataset: DatasetInfo) -> list[str]:
    """The tokenizer (text: data) and windows a set's dataset records."""
    lines = []
    if dataset.tokenizer is not None:
        tok = dataset.tokenizer
        lines.append(f"  tokenizer {tok.get('path')}  sha256 {str(tok.get('sha256'))[:16]}…")
    if dataset.windows is not None:
        w = dataset.windows
        lines.append(f"  windows of {w.get('max_length')} tokens sharing {w.get('stride')} "
                     f"({w.get('sequences_cut')} of {w.get('source_sequences')} sequences cut)")
    return lines

"""`export` and `import`: sets to and from the files other distillation tools read and write."""

from __future__ import annotations

from typing import Any

import click

from softlabels.cli._common import FloatList, echo, echo_json, progress_bar
from softlabels.format.info import SetInfo
from softlabels.format.layout import Layout
from softlabels.format.schema import DTYPE_CHOICES


@click.command("export")
@click.argument("transfer_set")
@click.option("--to", "to", type=click.Choice(["hf", "parquet"]), required=True,
              help="hf: a `datasets` directory (save_to_disk); parquet: Parquet shards.")
@click.argument("out")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="The stored T whose log-probabilities are exported.")
@click.option("--topk", type=int, default=None,
              help="A dense set is exported as its K most probable classes per position.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_cmd(transfer_set: str, to: str, out: str, temperature: float, topk: int | None,
               as_json: bool) -> None:
    """Export a sequence set to the columns Axolotl's KD plugin reads (input_ids, labels,
    target_token_ids, target_logprobs, target_mask) in a new directory OUT."""
    from softlabels.options import check_temperature
    from softlabels.sets.export import export_set

    t = check_temperature(temperature, "--temperature")
    with progress_bar("export", unit="position") as bar:
        summary = export_set(transfer_set, out, to=to, temperature=t, topk=topk, progress=bar)
    if as_json:
        echo_json(summary)
        return
    if summary.get("already_complete"):
        return echo(f"{out} is already complete ({summary['positions']} positions); nothing to do")
    echo(f"exported {summary['sequences']} sequences ({summary['positions']} positions, "
         f"{summary['kind']}, K = {summary['k']}, T = {summary['temperature']:g}) to "
         f"{summary['path']} ({to})")


@click.command("import")
@click.option("--out", required=True, help="The transfer set to write.")
@click.option("--vllm", "vllm", default=None, metavar="FILE.jsonl",
              help="vLLM prompt log-probs, one JSON object a line (docs/INTERCHANGE.md).")
@click.option("--parquet", default=None, metavar="PATH",
              help="Parquet (a file or a directory) or a `datasets` directory in the export's "
                   "columns.")
@click.option("--logits", default=None, metavar="FILE.npy", help="(R, C) teacher logits.")
@click.option("--topk-indices", default=None, metavar="FILE.npy", help="(R, k) classes.")
@click.option("--topk-values", default=None, metavar="FILE.npy",
              help="(R, k) logits (with --logsumexp), or log-probabilities at T = 1.")
@click.option("--logsumexp", default=None, metavar="FILE.npy",
              help="(R, K) logsumexp(logits / T) over all classes, per --temperatures.")
@click.option("--labels", default=None, metavar="FILE.npy", help="(R,) labels (default: the "
              "data's).")
@click.option("--index", default=None, metavar="FILE.npy",
              help="(R,) the data's example behind each row (default 0..R-1).")
@click.option("--data", default=None, help="DATA the rows were made from (sample hashes).")
@click.option("--teacher-name", default=None, help="The teacher, as you name it.")
@click.option("--topk", type=int, default=None, help="--vllm: the prompt_logprobs K asked of "
              "vLLM.")
@click.option("--vocab-size", type=int, default=None, help="The teacher's vocabulary size.")
@click.option("--num-classes", type=int, default=None, help="Top-k arrays: the classes C.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="--parquet (not a softlabels export): the T of its log-probabilities.")
@click.option("--temperatures", type=FloatList(), default="1", show_default=True,
              help="Arrays: the temperatures to store (top-k: one logsumexp column each).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32",
              show_default=True, help="Storage dtype of the logits (top-k or dense).")
@click.option("--overwrite", is_flag=True, help="Replace an existing transfer set at --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def import_cmd(out: str, vllm: str | None, parquet: str | None, logits: str | None,
               topk_indices: str | None, topk_values: str | None, logsumexp: str | None,
               labels: str | None, index: str | None, data: str | None,
               teacher_name: str | None, topk: int | None, vocab_size: int | None,
               num_classes: int | None, temperature: float, temperatures: list[float],
               dtype: str, overwrite: bool, as_json: bool) -> None:
    """Make a verified transfer set from vLLM prompt log-probs (--vllm), Parquet in the
    export's columns (--parquet), or arrays you already have (--logits, or --topk-indices
    with --topk-values)."""
    from softlabels.options import check_output_file

    arrays = logits or topk_indices or topk_values
    sources = [name for name, given in (("--vllm", vllm), ("--parquet", parquet),
                                        ("--logits/--topk-*", arrays)) if given]
    if len(sources) != 1:
        raise click.UsageError("pass exactly one of --vllm, --parquet, or arrays (--logits, or "
                               "--topk-indices with --topk-values)")
    unused = [name for name, given in (("--data", data), ("--labels", labels),
                                       ("--index", index), ("--logsumexp", logsumexp),
                                       ("--num-classes", num_classes)) if given is not None]
    if not arrays and unused:  # read by the array import only: never silently ignored
        raise click.UsageError(f"{', '.join(unused)} apply to arrays (--logits, --topk-*) "
                               f"only; {sources[0]} rows carry their own tokens, labels and "
                               "normalisers: leave them out (check the rows against their "
                               "data afterwards with `softlabels verify OUT --data DATA`)")
    check_output_file(out, directory_ok=True)
    with progress_bar("import", unit="position" if not arrays else "block") as bar:
        if vllm:
            meta = _vllm(vllm, out, topk, vocab_size, teacher_name, dtype, overwrite, bar)
        elif parquet:
            from softlabels.sets.parquet_import import import_parquet

            meta = import_parquet(parquet, out, teacher_name=teacher_name,
                                  vocab_size=vocab_size, temperature=temperature, dtype=dtype,
                                  overwrite=overwrite, progress=bar)
        else:
            from softlabels.sets.write_set import write_set

            if data is None or teacher_name is None:
                raise click.UsageError("arrays need --data (for the sample hashes) and "
                                       "--teacher-name")
            meta = write_set(out, data=data, teacher_name=teacher_name, logits=logits,
                             labels=labels, index=index, topk_indices=topk_indices,
                             topk_values=topk_values, logsumexp=logsumexp,
                             num_classes=num_classes, temperatures=temperatures, dtype=dtype,
                             overwrite=overwrite, progress=bar)
    _report(out, meta, as_json)


def _vllm(path: str, out: str, topk: int | None, vocab_size: int | None,
          teacher_name: str | None, dtype: str, overwrite: bool, bar: Any) -> dict[str, Any]:
    from softlabels.sets.vllm import import_vllm

    if topk is None or vocab_size is None or teacher_name is None:
        raise click.UsageError("--vllm needs --topk (the prompt_logprobs asked of vLLM), "
                               "--vocab-size and --teacher-name")
    return import_vllm(path, out, topk=topk, vocab_size=vocab_size, teacher_name=teacher_name,
                       dtype=dtype, overwrite=overwrite, progress=bar)


def _report(out: str, meta: dict[str, Any], as_json: bool) -> None:
    layout, info = Layout.from_meta(meta, where=out), SetInfo.from_meta(meta, where=out)
    summary = {"path": out, "num_rows": layout.num_rows, "num_classes": layout.num_classes,
               "temperatures": list(layout.temperatures), "sparse": layout.target.to_meta(),
               "sequences": layout.num_sequences or None,
               "teacher": info.teacher.to_meta(), "fingerprint": info.dataset.fingerprint}
    if as_json:
        echo_json(summary)
        return
    what = (f"{layout.num_sequences} sequences ({layout.num_rows} positions)"
            if layout.kind == "sequences" else f"{layout.num_rows} rows")
    kind = f"top-{summary['sparse']['k']}" if summary["sparse"] else "dense"
    echo(f"wrote {out}: {what}, {kind} over {layout.num_classes} classes at "
         f"T = {list(layout.temperatures)}; check it with `softlabels verify {out}`")

"""`softlabels precompute`: stage one from the command line."""

from __future__ import annotations

import click

from softlabels.cli._common import TRUST_CODE_HELP, FloatList, echo, progress_bar
from softlabels.format.schema import COMBINE_CHOICES, DTYPE_CHOICES
from softlabels.options import PRECISION_CHOICES, PrecomputeOptions


@click.command()
@click.option("--data", required=True, help="DATA spec, e.g. mnist:data?split=train or npz:x.npz")
@click.option("--teacher", "teachers", multiple=True, required=True,
              help="MODEL spec or checkpoint; repeat for an ensemble.")
@click.option("--out", required=True, help="Transfer set to write: DIR.zarr (default) or FILE.h5.")
@click.option("--temperatures", type=FloatList(), default="1", show_default=True,
              help="Temperatures at which to store probabilities.")
@click.option("--batch-size", type=int, default=PrecomputeOptions.batch_size, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=PrecomputeOptions.dtype,
              show_default=True, help="Storage dtype of logits.")
@click.option("--probs-dtype", type=click.Choice(DTYPE_CHOICES),
              default=PrecomputeOptions.probs_dtype, show_default=True,
              help="Storage dtype of probabilities (float16 underflows).")
@click.option("--combine", type=click.Choice(COMBINE_CHOICES), default=PrecomputeOptions.combine,
              show_default=True, help="How ensemble members combine.")
@click.option("--keep-members", is_flag=True, help="Also store each member's logits.")
@click.option("--store-inputs", is_flag=True,
              help="Also store the preprocessed inputs: DATA `transferset:SET` then trains "
                   "from the set alone.")
@click.option("--topk", type=int, default=0,
              help="Store only the K largest logits and per-T normalisers (sparse).")
@click.option("--sample-k", type=int, default=0,
              help="Store K classes drawn from each p_T instead (sparse, unbiased).")
@click.option("--nucleus", type=float, default=0.0,
              help="Hybrid target (with --topk K): per row the fewest largest classes covering "
                   "mass P of p at the first stored T, at most K, exact; see docs/SPARSE.md.")
@click.option("--tail", type=int, default=0,
              help="Hybrid: M more classes drawn from the rest of each row's mass, weighted so "
                   "that the loss and its gradient are unbiased.")
@click.option("--quantize", type=click.Choice(["0", "8"]), default="0", show_default=True,
              callback=lambda _c, _p, v: int(v),
              help="Hybrid: store values as 8-bit steps below the row maximum (per-row step).")
@click.option("--views", type=int, default=0,
              help="Store V augmented views per example (with --augment).")
@click.option("--augment", default=None,
              help="Views' augmentation, e.g. random-crop:2,hflip (see docs/FORMAT.md).")
@click.option("--view-seed", type=int, default=0, show_default=True,
              help="Base seed of the views.")
@click.option("--chunk-rows", type=int, default=0, help="Rows per chunk (default: ~1 MiB).")
@click.option("--shard-rows", type=int, default=None, help="Rows per Zarr shard (optional).")
@click.option("--device", default=PrecomputeOptions.device, show_default=True,
              help="auto, cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES),
              default=PrecomputeOptions.precision, show_default=True,
              help="Autocast precision of the teacher.")
@click.option("--num-workers", type=int, default=0, show_default=True,
              help="DataLoader worker processes.")
@click.option("--decode-device", default=PrecomputeOptions.decode_device, show_default=True,
              help="Where image DATA is decoded: cpu (in the --num-workers workers) or cuda.")
@click.option("--skip-bad-images", is_flag=True,
              help="Leave out images that cannot be decoded (a decoding pass first); they are "
                   "listed in the set's metadata (dataset.skipped).")
@click.option("--overwrite", is_flag=True, help="Replace an existing set made by another run.")
@click.option("--workers", type=int, default=None,
              help="Spread blocks over a local Dask cluster of N single-threaded processes.")
@click.option("--scheduler", default=None, help="Use the running Dask cluster at ADDRESS.")
@click.option("--trust-code", is_flag=True, help=TRUST_CODE_HELP)
@click.option("--random-teacher", is_flag=True,
              help="Accept a teacher with no trained weights (an architecture spec without a "
                   "weights file); otherwise refused, its targets being noise.")
def precompute(data: str, teachers: tuple[str, ...], out: str, overwrite: bool,
               workers: int | None, scheduler: str | None, **flags: object) -> None:
    """Run the teacher(s) once over DATA and write their soft targets to a transfer set."""
    from softlabels.compute.blocks import KINDS
    from softlabels.compute.blocks import precompute as run
    from softlabels.sources.tokens import data_kind

    options = PrecomputeOptions(**flags)  # type: ignore[arg-type]  # checked once, here
    with progress_bar("precompute", unit=KINDS[data_kind(data)].unit) as bar:
        if workers is not None or scheduler is not None:
            from softlabels.compute.cluster import precompute_on_cluster

            result = precompute_on_cluster(data, list(teachers), out, options, workers=workers,
                                           scheduler=scheduler, overwrite=overwrite,
                                           progress=bar)
        else:
            result = run(data, list(teachers), out, options, overwrite=overwrite, progress=bar)
    seq = result.meta.get("sequence")  # a sequence set: one row per token position
    rows = (f"{result.num_rows} positions of {seq['num_sequences']} sequences" if seq
            else f"{result.num_rows} rows")
    if result.already_complete:
        echo(f"{out} is already complete ({rows}); nothing to do")
    else:
        how = "resumed, " if result.resumed else ""
        done = f"{result.rows_computed}{' positions' if seq else ''}"
        echo(f"wrote {out}: {rows} x {result.meta['num_classes']} classes "
                   f"at T={','.join(f'{t:g}' for t in result.meta['temperatures'])} "
                   f"({how}{done} computed in {result.seconds:.1f}s)")

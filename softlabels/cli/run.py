"""`softlabels run`: the paper's experiments from a pipeline file."""

from __future__ import annotations

import click

from softlabels.cli._common import TRUST_CODE_HELP, echo, epoch_bars


@click.command(name="run")
@click.argument("pipeline")
@click.option("--out", default=None, help="Output directory (default: the file's `out`).")
@click.option("--quick", is_flag=True, help="The same steps, small and fast (for tests).")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override one value of the file, e.g. --set temperature_sweep.max_epochs=300.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Train every configuration from this many seeds (default: the file's).")
@click.option("--trust-code", is_flag=True, help=TRUST_CODE_HELP)
def run_cmd(pipeline: str, out: str | None, quick: bool, overrides: tuple[str, ...],
            seeds: int | None, trust_code: bool) -> None:
    """Run a pipeline file (e.g. pipelines/mnist_hinton.toml); a rerun skips finished steps."""
    from softlabels.experiments.pipeline import run_pipeline

    if seeds is not None:
        overrides = (*overrides, f"seeds={seeds}")
    results = run_pipeline(pipeline, out=out, quick=quick, overrides=overrides,
                           say=lambda m: echo(m, err=True), callbacks=[epoch_bars()],
                           trust_code=trust_code)
    where = results.get("out_dir", "")
    echo(f"results: {where}results.json, results.md and PNG plots "
               f"({results['seconds_this_run']} s this run)")

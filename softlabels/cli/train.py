"""Stage two from the command line: train and evaluate."""

from __future__ import annotations

import contextlib
import os

import click

from softlabels.cli._common import TRUST_CODE_HELP, IntList, echo, echo_json, epoch_bars, parse_bias
from softlabels.format.lease import WriterLease
from softlabels.options import (
    OPTIMIZER_CHOICES,
    TOPK_CONVENTION_HELP,
    TOPK_CONVENTIONS,
    TrainOptions,
    check_output_file,
)

# how the teacher's probabilities at T = 1 were rebuilt from an example set's sparse targets
_ESTIMATED = {"topk": "  (top-k: the rest of the mass spread evenly over the other classes)",
              "sample": "  (sampled: against the frequencies of k draws, not p_T)",
              "hybrid": "  (hybrid: the head exact, the tail from weighted draws)"}


@click.command()
@click.option("--data", required=True, help="DATA spec of the training inputs.")
@click.option("--model", required=True, help="MODEL spec of the student (or a checkpoint).")
@click.option("--out", required=True, help="Checkpoint to write (a MODEL spec for later use).")
@click.option("--transfer-set", default=None, help="Train from these stored soft targets.")
@click.option("--temperature", type=float, default=None,
              help="Distillation T (default: the set's first stored T); needs --transfer-set.")
@click.option("--alpha", type=float, default=None,
              help="Weight of the soft term (default 0.9); 1 - alpha weighs the hard labels; "
                   "needs --transfer-set.")
@click.option("--topk-loss", type=click.Choice(TOPK_CONVENTIONS), default=TrainOptions.topk_loss,
              show_default=True, help="From a top-k set: " + TOPK_CONVENTION_HELP)
@click.option("--epochs", type=int, default=TrainOptions.epochs, show_default=True)
@click.option("--batch-size", type=int, default=TrainOptions.batch_size, show_default=True,
              help="Rows per step on each rank: under --distributed with N ranks a step sees "
                   "N x this many rows.")
@click.option("--lr", type=float, default=TrainOptions.lr, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZER_CHOICES),
              default=TrainOptions.optimizer, show_default=True)
@click.option("--weight-decay", type=float, default=TrainOptions.weight_decay, show_default=True)
@click.option("--seed", type=int, default=TrainOptions.seed, show_default=True)
@click.option("--fraction", type=float, default=None, help="Seeded stratified subset, (0, 1].")
@click.option("--classes", type=IntList(), default=None, help="Keep only these classes.")
@click.option("--exclude-classes", type=IntList(), default=None, help="Drop these classes.")
@click.option("--indices", default=None, help="File of dataset indices to keep (.txt or .npy).")
@click.option("--val-data", default=None, help="DATA spec to report accuracy on each epoch.")
@click.option("--jitter", "jitter_pixels", type=int, default=TrainOptions.jitter_pixels,
              show_default=True, help="Shift training images by up to this many pixels.")
@click.option("--device", default=TrainOptions.device, show_default=True)
@click.option("--distributed", is_flag=True,
              help="Data-parallel across the ranks torchrun starts (gloo on CPU); "
                   "--batch-size is per rank.")
@click.option("--views-per-epoch", type=int, default=TrainOptions.views_per_epoch,
              show_default=True, help="From a view set: stored views of each example per epoch.")
@click.option("--stream", is_flag=True,
              help="Stream the set's targets from whole blocks instead of loading them (the "
                   "default past 2 GiB of targets, 4 GiB for a sequence set).")
@click.option("--loader-workers", type=int, default=TrainOptions.loader_workers,
              show_default=True,
              help="DataLoader worker processes reading a streamed set; the batches and their "
                   "order are the same for any number.")
@click.option("--state-every", type=int, default=TrainOptions.state_every, show_default=True,
              help="With a streamed set (or any sequence set), also write OUT.state every N "
                   "steps, so a killed run resumes mid-epoch (0: after each epoch only).")
@click.option("--trust-code", is_flag=True, help=TRUST_CODE_HELP)
@click.option("--cache", "cache", default=None, metavar="DIR",
              help="Keep the chunks of a --transfer-set at a URL in DIR, so later epochs (and "
                   "runs) read them from local disk; same as SOFTLABELS_CACHE=DIR.")
@click.option("--cache-max-bytes", default=None, metavar="SIZE",
              help="Bound of the --cache DIR (e.g. 20G; default: half the free disk space, at "
                   "most 64G); same as SOFTLABELS_CACHE_MAX_BYTES.")
def train(data: str, model: str, out: str, transfer_set: str | None, indices: str | None,
          val_data: str | None, cache: str | None, cache_max_bytes: str | None, stream: bool,
          **flags: object) -> None:
    """Train a student from a transfer set's soft targets, or from hard labels without one.

    Rerunning the same command after a kill resumes after the last finished epoch (state in
    OUT.state, with the digests of --data and --indices: a rerun onto changed ones is
    refused)."""
    from softlabels.format.chunk_cache import MAX_BYTES_ENV, parse_bytes
    from softlabels.format.location import CACHE_ENV
    from softlabels.train.trainer import train_student

    if cache:  # through the environment, so DataLoader workers and ranks read through it too
        os.environ[CACHE_ENV] = os.path.abspath(cache)
    if cache_max_bytes is not None:
        os.environ[MAX_BYTES_ENV] = str(parse_bytes(cache_max_bytes))

    options = TrainOptions(**flags)  # type: ignore[arg-type]  # checked once, here
    with _one_trainer(out, distributed=options.distributed):
        result = train_student(data, model, options, out=out, transfer_set=transfer_set,
                               indices=indices, val_data=val_data,
                               stream=True if stream else None, callbacks=[epoch_bars()])
    if result.rank != 0:
        return  # rank 0 wrote the checkpoint and reports
    last = result.history[-1]
    held = "".join(f", {k} {v:.4f}" for k, v in last.items() if k.startswith("val_"))
    how = f"soft targets of {transfer_set}" if transfer_set else "hard labels"
    echo(f"wrote {out}: {result.spec} trained {options.epochs} epochs on {result.rows} "
         f"{result.unit} from {how} in {result.seconds:.1f}s (loss {last['loss']:.4f}{held})")


def _one_trainer(out: str, *, distributed: bool) -> WriterLease | contextlib.nullcontext:
    """The writer lease on `--out` (`OUT.lock`, as precompute's): a second `train` into the
    same checkpoint, which would share its resume state `OUT.state`, is refused naming the
    holder; a killed holder's lease is taken over at once. Under torchrun, rank 0 holds it
    (it alone writes the state and the checkpoint)."""
    if distributed and os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    check_output_file(out, checkpoint=True)  # named as such, not as a lease it cannot take
    return WriterLease(out)


@click.command()
@click.option("--data", required=True,
              help="DATA spec to evaluate on (tokens:... for a sequence model).")
@click.option("--model", required=True, help="Checkpoint (or MODEL spec) to evaluate.")
@click.option("--bias-adjust", multiple=True, help="CLASS=VALUE added to a class's logit bias.")
@click.option("--transfer-set", default=None,
              help="A set of the same data: report agreement with and KL to its teacher.")
@click.option("--temperature", type=float, default=None,
              help="With a sequence set: compare with its targets at this T (default 1 where "
                   "stored, else the set's first T).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--trust-code", is_flag=True, help=TRUST_CODE_HELP)
def evaluate(data: str, model: str, bias_adjust: tuple[str, ...], transfer_set: str | None,
             temperature: float | None, device: str, as_json: bool, trust_code: bool) -> None:
    """Accuracy, errors per class, calibration, and agreement with a teacher; for a sequence
    model on tokens:... DATA, per-token cross-entropy, perplexity and next-token accuracy."""
    from softlabels.sets.evaluate import evaluate as run

    report = run(data, model, bias_adjust=parse_bias(bias_adjust), transfer_set=transfer_set,
                 device=device, trust_code=trust_code, temperature=temperature)
    if as_json:
        echo_json(report)
    elif "perplexity" in report:
        _echo_sequence_report(report)
    else:
        echo(f"accuracy {report['accuracy']:.4f}  errors {report['errors']} of "
                   f"{report['n']}  ECE {report['ece']:.4f}")
        echo("errors per class: " + " ".join(f"{k}:{v}" for k, v in
                                                   enumerate(report["per_class_errors"])))
        if "teacher_agreement" in report:
            echo(f"agreement with teacher {report['teacher_agreement']:.4f}  "
                 f"KL(teacher||student) {report['kl_to_teacher']:.4f}"
                 + _ESTIMATED.get(str(report.get("teacher_targets")), ""))



def _echo_sequence_report(report: dict[str, object]) -> None:
    echo(f"perplexity {report['perplexity']:.4f}  cross-entropy "
               f"{report['cross_entropy']:.4f} nats/token  token accuracy "
               f"{report['token_accuracy']:.4f}  over {report['positions']} positions of "
               f"{report['sequences']} sequences")
    if "teacher_targets" not in report:
        return
    where = (f"at T = {report['teacher_temperature']:g} over {report['teacher_positions']} "
             f"distilled positions ({report['teacher_targets']} targets)")
    if "teacher_agreement" in report:
        kl = ("KL(teacher||student) {:.4f}{}".format(
                  report["kl_to_teacher"], " (an unbiased estimate from the tail's draws: it "
                  "can fall below 0)" if report["teacher_targets"] == "hybrid" else "")
              if "kl_to_teacher" in report else
              "KL over the top-k and the rest {:.4f} (a lower bound on the full KL)".format(
                  report["kl_to_teacher_topk"]))
        echo(f"agreement with teacher {report['teacher_agreement']:.4f}  {kl}  {where}")
    else:
        echo(f"cross-entropy to the teacher's samples {report['teacher_cross_entropy']:.4f}"
                   f" nats/token (KL and agreement need more than samples)  {where}")


# --- pipelines --------------------------------------------------------------------------------

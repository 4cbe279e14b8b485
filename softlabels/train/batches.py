"""What differs between kinds of row in stage two, behind one small interface (`Rows`), with one
implementation per kind chosen once by the set's (or the data's) kind through `KINDS`:

- `ExampleRows` (one row per example): batches of rows (hard labels; soft targets in memory,
  replayed views, or streamed from whole blocks: plans.py), an input of (B, ...) examples,
  Hinton KD (dense or sparse) or cross-entropy, a student mapping examples to (B, C) logits,
  held-out accuracy; Adam or SGD.
- `SequenceRows` (one row per token position): batches of whole sequences cut by length
  (padded.py), an input of (B, L) token ids, `sequence_kd_loss` over the masked-in positions,
  a student mapping (B, L) ids to (B, L, C) logits, held-out perplexity; AdamW with cosine
  decay and clipped gradients.

The one loop that runs either (optimizer steps, epochs, resume, the finite-loss check, the
record) is trainer.py's."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from softlabels.errors import DataError, MismatchError, OptionError
from softlabels.format import schema as S
from softlabels.format.reader import TransferSet
from softlabels.format.selection import read_indices, select_sequences
from softlabels.format.sequence import read_offsets
from softlabels.options import TrainOptions
from softlabels.sources.images import model_inputs
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences, data_kind
from softlabels.train.datasets import MAX_IN_MEMORY as EXAMPLE_MAX_IN_MEMORY
from softlabels.train.datasets import check_alignment
from softlabels.train.losses import (
    kd_loss_from_probs,
    sequence_kd_loss,
    sparse_kd_loss,
    target_convention,
)
from softlabels.train.metrics import evaluate_sequence_model
from softlabels.train.padded import (
    MAX_IN_MEMORY,
    SequenceBatches,
    StreamingSequenceBatches,
    check_tokens,
    target_bytes,
)
from softlabels.train.plans import (
    StreamedEpochs,
    hard_label_epochs,
    in_memory_epochs,
    jitter,
    materialize,
    predict,
    streamed_epochs,
)
from softlabels.train.ranks import refuse_zero_steps
from softlabels.train.run import Run
from softlabels.train.students import (
    NOTHING_TO_DISTIL,
    check_masked_in,
    check_sequence_student,
    check_student_vocabulary,
)


@dataclass
class Stepper:
    """An optimizer, its learning-rate schedule (None: constant) and gradient clipping."""

    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    clip: float | None = None

    def step(self, net: nn.Module) -> None:
        if self.clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), self.clip)
        self.opt.step()
        if self.schedule is not None:
            self.schedule.step()

    def advance(self, steps: int) -> None:
        """The schedule where a resumed run stopped (the optimizer's own state is restored)."""
        if self.schedule is None:
            return
        with warnings.catch_warnings():  # no optimizer step here: the restored state's
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                self.schedule.step()


class Rows(Protocol):
    """One kind of row's part of stage two, for one run: `KINDS[kind].open(run, net)`."""

    unit: ClassVar[str]  # what a row is, in records: "rows" | "positions"
    nothing: ClassVar[str]  # the error when an epoch trains on no row
    rows: int  # rows (positions) trained on per epoch
    steps: int  # batches per epoch, on each rank
    streamed: bool
    temperature: float | None
    alpha: float
    meta: dict[str, Any]  # the kind's fields of the checkpoint's record
    digest: dict[str, Any]  # the kind's fields of what identifies the run (resume.run_digest)

    @classmethod
    def check_options(cls, opts: TrainOptions) -> None:
        """Refuse options this kind of row has no use for, before any work."""

    @classmethod
    def open(cls, run: Run, net: nn.Module) -> Rows:
        """Check the data, the set and the student against each other; cut the batches."""

    def epoch(self, epoch: int, resume: dict[str, int] | None) -> Iterable[Any]:
        """`epoch`'s batches, or with `resume` (a `state_dict()`) the rest of them."""

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands (epoch, batches served, seed)."""

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """The batch's loss and how many rows (positions) its mean is over."""

    def score(self, net: nn.Module) -> dict[str, float]:
        """Held-out metrics after an epoch ({} without --val-data)."""

    def optimizer(self, net: nn.Module, epochs: int) -> Stepper: ...


# --- one row per example --------------------------------------------------------------------

@dataclass
class ExampleRows:
    """Rows of examples: see plans.py for the batches of each source of targets."""

    unit: ClassVar[str] = "rows"
    nothing: ClassVar[str] = "no row was trained on in an epoch; select more rows"
    run: Run
    batches: Any  # plans.Plan's batches(epoch[, resume])
    rows: int
    steps: int
    streamed: bool
    val: tuple[torch.Tensor, torch.Tensor] | None
    meta: dict[str, Any]
    digest: dict[str, Any]

    @property
    def temperature(self) -> float | None:
        return self.run.temperature

    @property
    def alpha(self) -> float:
        return 0.9 if self.run.opts.alpha is None else self.run.opts.alpha

    @classmethod
    def check_options(cls, opts: TrainOptions) -> None:
        return None

    @classmethod
    def open(cls, run: Run, net: nn.Module) -> ExampleRows:
        opts, ts, data, world = run.opts, run.ts, run.data, run.world
        dataset = model_inputs(load_data(data) if isinstance(data, str) else data)
        if len(dataset) == 0:
            raise DataError("the dataset is empty: there is nothing to train on; check --data")
        indices = run.indices
        select = dict(fraction=opts.fraction, seed=opts.seed, classes=opts.classes,
                      exclude_classes=opts.exclude_classes,
                      indices=read_indices(indices) if isinstance(indices, (str, os.PathLike))
                      else indices, num_examples=len(dataset))
        stream = run.stream
        if stream is None:
            stream = ts is not None and ts.num_rows * ts.num_classes * 4 > EXAMPLE_MAX_IN_MEMORY
        if (opts.loader_workers or opts.state_every) and not (stream and ts is not None):
            raise OptionError("--loader-workers and --state-every apply to a streamed set; pass "
                              "--transfer-set with --stream, or leave them out")
        if ts is None:
            plan = hard_label_epochs(run, dataset, net, select)
        elif not stream:
            plan = in_memory_epochs(run, dataset, net, select)
        else:
            plan = streamed_epochs(run, dataset, net, select)
        batches, n_rows, n_batches = plan
        if n_rows == 0:
            raise DataError("the selection leaves no rows to train on; widen --fraction, "
                            "--classes or --indices")
        refuse_zero_steps(n_batches, n_rows, world, streamed=bool(stream and ts is not None),
                          blocks=None if ts is None else ts.num_blocks)
        val = (materialize(model_inputs(load_data(run.val_data) if isinstance(run.val_data, str)
                                        else run.val_data))
               if run.val_data is not None else None)
        return cls(run=run, batches=batches, rows=n_rows, steps=n_batches,
                   streamed=bool(stream), val=val,
                   meta={"world_size": world, "batch_size_is": "per rank",
                         "global_batch_size": opts.batch_size * world},
                   digest={"select": select, "jitter": opts.jitter_pixels,
                           "views_per_epoch": opts.views_per_epoch, "world": world})

    def epoch(self, epoch: int, resume: dict[str, int] | None) -> Iterable[Any]:
        if isinstance(self.batches, StreamedEpochs):
            return self.batches(epoch, resume)
        return self.batches(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Hard-label CE without a set; Hinton KD against dense targets; sparse KD otherwise."""
        run = self.run
        x = jitter(batch[0], run.opts.jitter_pixels, run.gen).to(run.dev)
        y, targets = batch[1].to(run.dev), [t.to(run.dev) for t in batch[2:]]
        z, ts = net(x), run.ts
        if ts is None:
            return F.cross_entropy(z, y, ignore_index=-1), len(x)
        if ts.target.sparse:
            convention = target_convention(ts.target.name, run.opts.topk_loss)
            return sparse_kd_loss(z, *targets, temperature=self.temperature, labels=y,
                                  alpha=self.alpha, convention=convention), len(x)
        return kd_loss_from_probs(z, targets[0], temperature=self.temperature, labels=y,
                                  alpha=self.alpha), len(x)

    def score(self, net: nn.Module) -> dict[str, float]:
        if self.val is None:
            return {}
        pred = predict(net, self.val[0], self.run.dev).argmax(-1)
        known = self.val[1] >= 0
        return {"val_accuracy": float((pred[known] == self.val[1][known]).float().mean())}

    def optimizer(self, net: nn.Module, epochs: int) -> Stepper:
        o = self.run.opts
        if o.optimizer == "sgd":
            return Stepper(torch.optim.SGD(net.parameters(), lr=o.lr, momentum=0.9,
                                           weight_decay=o.weight_decay))
        return Stepper(torch.optim.Adam(net.parameters(), lr=o.lr, weight_decay=o.weight_decay))


# --- one row per token position -------------------------------------------------------------

_NOT_FOR_SEQUENCES = (  # option, its default, flag, what to do instead
    ("classes", None, "--classes", "a sequence set is cut by whole sequences: use --fraction "
                                   "or --indices"),
    ("exclude_classes", None, "--exclude-classes", "a sequence set is cut by whole sequences: "
                                                   "use --fraction or --indices"),
    ("jitter_pixels", 0, "--jitter", "drop it (it shifts images)"),
    ("views_per_epoch", 1, "--views-per-epoch", "drop it (a sequence set holds no views)"),
    ("distributed", False, "--distributed", "drop it: sequence students train in one process"),
    ("optimizer", "adam", "--optimizer sgd", "drop it: sequence students train with AdamW"),
    ("loader_workers", 0, "--loader-workers", "drop it: sequence batches are cut in the main "
                                              "process"),
)

SequenceBatchesType = SequenceBatches | StreamingSequenceBatches


@dataclass
class SequenceRows:
    """Rows of token positions, trained in batches of whole sequences (padded.py)."""

    unit: ClassVar[str] = "positions"
    nothing: ClassVar[str] = NOTHING_TO_DISTIL
    batches: SequenceBatchesType
    dev: torch.device
    temperature: float = 1.0
    alpha: float = 0.9
    topk_loss: str = "residual"
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    val: SequenceBatches | None = None
    streamed: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    digest: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.batches.num_positions

    @property
    def steps(self) -> int:
        return len(self.batches)

    @classmethod
    def check_options(cls, opts: TrainOptions) -> None:
        for name, default, flag, advice in _NOT_FOR_SEQUENCES:
            if getattr(opts, name) != default:
                raise OptionError(f"{flag} does not apply to token sequences; {advice}")

    @classmethod
    def open(cls, run: Run, net: nn.Module) -> SequenceRows:
        """A student mapping (B, L) token ids to (B, L, C) logits, trained from the set's stored
        targets (or, without a set, from the hard next tokens); the targets are loaded when
        they fit (MAX_IN_MEMORY), else streamed; `--fraction`/`--indices` select whole
        sequences as `softlabels subset` does."""
        opts, ts = run.opts, run.ts
        dataset = load_data(run.data) if isinstance(run.data, str) else run.data
        if not isinstance(dataset, TokenSequences):
            where = (f"{ts.path} is a sequence set (one row per token of "
                     f"{ts.layout.num_sequences} sequences) but " if ts is not None else "")
            raise MismatchError(f"{where}--data {run.name} is not token sequences; pass the "
                                "tokens:... DATA it was made from")
        chosen = _chosen(dataset, ts, run.indices, opts)
        if ts is not None:
            offsets = read_offsets(ts)
            check_alignment(dataset, ts, offsets[:-1][chosen], seed=opts.seed)
            check_tokens(dataset, ts, offsets)
        probe = torch.cat([dataset[int(chosen[0])][:7],
                           torch.tensor([int(dataset.tokens.max())])])
        if ts is not None:
            classes = check_sequence_student(net, probe, ts.num_classes, device=run.dev,
                                             where=f"{ts.path} has {ts.num_classes} classes")
        else:  # hard next tokens: any vocabulary that holds the data's ids
            classes = check_sequence_student(net, probe, None, where="", device=run.dev)
            check_student_vocabulary(dataset, classes)
        stream = run.stream
        if stream is None:
            stream = ts is not None and target_bytes(ts) > MAX_IN_MEMORY
        common = dict(batch_size=opts.batch_size, sequences=chosen, seed=opts.seed)
        if ts is None:
            batches: SequenceBatchesType = SequenceBatches.from_tokens(dataset, **common)
        elif stream:
            batches = StreamingSequenceBatches(ts, temperature=run.temperature, **common)
        else:
            batches = SequenceBatches(ts, temperature=run.temperature, **common)
        if not stream:  # streamed: refused after a first epoch of no position
            check_masked_in(batches)
        val = None
        if run.val_data is not None:
            held = (load_data(run.val_data) if isinstance(run.val_data, str) else run.val_data)
            if not isinstance(held, TokenSequences):
                raise MismatchError(f"--val-data {run.val_data} is not token sequences; pass "
                                    "tokens:... held-out text for a sequence student")
            val = SequenceBatches.from_tokens(held, batch_size=opts.batch_size, shuffle=False,
                                              num_classes=classes)
        temperature = 1.0 if ts is None else run.temperature
        alpha = 0.0 if ts is None else 0.9 if opts.alpha is None else opts.alpha
        torch.manual_seed(opts.seed)  # the steps' random state starts at the seed
        return cls(batches=batches, dev=run.dev, temperature=temperature, alpha=alpha,
                   topk_loss=opts.topk_loss, lr=opts.lr, weight_decay=opts.weight_decay,
                   val=val, streamed=bool(stream),
                   meta={"sequences": int(len(chosen)), "alpha": alpha,
                         "temperature": temperature},
                   digest={"sequences": chosen.tolist(), "val": run.val_data is not None,
                           # the epochs too: they shape the learning-rate schedule
                           "run": ("sequence", opts.epochs)})

    def epoch(self, epoch: int, resume: dict[str, int] | None) -> Iterable[Any]:
        self.batches.set_epoch(epoch)
        if resume is not None:
            self.batches.load_state_dict(resume)
        return self.batches

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        batch = batch.to(self.dev)
        loss = sequence_kd_loss(net(batch.tokens), batch, temperature=self.temperature,
                                alpha=self.alpha, topk_loss=self.topk_loss)
        return loss, int(batch.mask.sum())

    def score(self, net: nn.Module) -> dict[str, float]:
        if self.val is None:
            return {}
        held = evaluate_sequence_model(net, self.val, device=str(self.dev))
        net.train()
        return {"val_perplexity": held["perplexity"],
                "val_token_accuracy": held["token_accuracy"]}

    def optimizer(self, net: nn.Module, epochs: int) -> Stepper:
        """AdamW, the learning rate decaying on a cosine over all steps, gradients clipped."""
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = epochs * len(self.batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        return Stepper(opt, schedule, self.clip)


KINDS: dict[str, type[ExampleRows] | type[SequenceRows]] = {
    "examples": ExampleRows, "sequences": SequenceRows}  # keyed by format.layout.ROW_KINDS


def _chosen(data: TokenSequences, ts: TransferSet | None,
            indices: str | os.PathLike[str] | np.ndarray | None,
            opts: TrainOptions) -> np.ndarray:
    """The sequences `--fraction`/`--indices` keep (their numbers in the set, or the data)."""
    offsets = data.offsets if ts is None else read_offsets(ts)
    index = np.arange(len(data)) if ts is None else ts.index()[offsets[:-1]]
    if isinstance(indices, (str, os.PathLike)):
        indices = read_indices(indices)
    return select_sequences(_Index(index, offsets[:-1]), offsets, fraction=opts.fraction,
                            seed=opts.seed,
                            indices=None if indices is None else np.asarray(indices))


class _Index:
    """The dataset index of each sequence (starting at row `starts`), read as
    `select_sequences` reads a set."""

    def __init__(self, index: np.ndarray, starts: np.ndarray) -> None:
        self.index, self._starts = index, starts

    def rows(self, names: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        return {S.INDEX: self.index[np.searchsorted(self._starts, rows)]}


def row_kind(name: str, data: str | Dataset, ts: TransferSet | None) -> str:
    """The kind of row (format.layout.ROW_KINDS) a run on `data` (named `name`) and `ts` is
    of: the set's, else the data's. Token-sequence DATA with an example set is refused here
    (the reverse is the sequence kind's to refuse: it loads the data to know)."""
    if ts is None:
        return data_kind(data)
    if data_kind(data) == "sequences" and ts.layout.kind == "examples":
        raise MismatchError(f"--data {name} is token sequences but {ts.path} is an example "
                            "set (one row per example); pass the DATA it was made from, or "
                            "a sequence set made from this data (precompute --data "
                            "tokens:...)")
    return ts.layout.kind

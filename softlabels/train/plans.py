"""What an example student trains on, epoch by epoch (batches.ExampleRows; trainer.py runs
the steps): a `Plan` per source of targets (hard labels; soft targets held in memory, or
replayed views of a view set; soft targets streamed from whole checked blocks), each giving
the epoch's batches, the rows trained on and the batches per epoch, shared across
`torch.distributed` ranks; the examples' inputs (`materialize`, `jitter`) and logits
(`predict`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from softlabels.compute.views import replay
from softlabels.errors import SoftlabelsError
from softlabels.format.selection import select_rows
from softlabels.sources.arrays import check_labels, hashed_item, split_item
from softlabels.train.datasets import (
    SoftTargetBatches,
    SoftTargetDataset,
    check_length,
    selected_rows,
)
from softlabels.train.ranks import rank_share
from softlabels.train.run import Run
from softlabels.train.students import check_outputs


def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image (N, C, H, W) by up to `pixels` in x and y, filling with zeros."""
    if pixels <= 0 or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4)
    dy, dx = (torch.randint(0, 2 * pixels + 1, (2, n), generator=generator))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device,
            batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, C) of `model` in eval mode, on the CPU."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def materialize(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (inputs, labels) of a dataset as two tensors: one pass, then training is indexing."""
    pairs = [split_item(data[i]) for i in range(len(data))]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


class Cached(Dataset):
    """A dataset's examples at chosen indices, read once and held as tensors. It keeps the
    dataset's length and indexing (so it joins a transfer set by `index`) but serves only
    those indices, with their sample hashes (an image's covers its encoded file)."""

    def __init__(self, data: Dataset, indices: np.ndarray) -> None:
        self.n = len(data)
        self.pos = {int(i): k for k, i in enumerate(indices)}
        items = [hashed_item(data, int(i)) for i in indices]
        self.x = torch.stack([x for x, _, _ in items])
        self.y = torch.tensor([y for _, y, _ in items])
        self.hashes = [h for _, _, h in items]

    def example_hash(self, i: int) -> int:
        return self.hashes[self.pos[int(i)]]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        k = self.pos[int(i)]
        return self.x[k], int(self.y[k])


def _batches(tensors: Sequence[torch.Tensor], batch_size: int, generator: torch.Generator,
             rank: int = 0, world: int = 1) -> Iterator[list[torch.Tensor]]:
    # Every rank draws the same permutation (same seed) and takes its own share of it.
    order = rank_share(torch.randperm(len(tensors[0]), generator=generator), rank, world)
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        yield [t[b] for t in tensors]


def _view_batches(run: Run, sds: SoftTargetDataset, x_examples: torch.Tensor,
                  tensors: list[torch.Tensor], examples: np.ndarray, per_epoch: int,
                  rng: np.random.Generator) -> Iterator[list[torch.Tensor]]:
    """An epoch over a view set: `per_epoch` stored views of each example, drawn afresh each
    epoch, each replayed from its seed. tensors = [example position, labels, targets...]."""
    batch_size = run.opts.batch_size
    draw = np.lexsort((rng.random(len(examples)), examples))  # views of an example together
    ex = examples[draw]
    nth = np.arange(len(draw)) - np.searchsorted(ex, ex, side="left")
    keep = draw[nth < per_epoch]
    order = rank_share(torch.from_numpy(rng.permutation(keep)), run.rank, run.world)
    for i in range(0, len(order), batch_size):
        b = order[i:i + batch_size]
        x = torch.stack([replay(sds.transform, x_examples[int(tensors[0][j])],
                                int(sds.view_seeds[j])) for j in b.tolist()])
        yield [x, *[t[b] for t in tensors[1:]]]


Plan = tuple[Callable[[int], Iterator[list[torch.Tensor]]], int, int]  # batches(epoch), rows, n


def hard_label_epochs(run: Run, dataset: Dataset, net: nn.Module,
                      select: dict[str, Any]) -> Plan:
    """Batches of the data's examples and hard labels (no transfer set)."""
    batch_size, gen, rank, world = run.opts.batch_size, run.gen, run.rank, run.world
    x_all, y_all = materialize(dataset)
    check_labels(y_all.numpy(), where="the data")
    rows = select_rows(y_all.numpy(), **select)
    check_outputs(net, x_all[:1].to(run.dev), None, y_all)
    if (y_all[rows] < 0).all():
        raise SoftlabelsError("the data has no labels; train from a transfer set")
    tensors = [x_all[rows], y_all[rows]]
    return (lambda epoch: _batches(tensors, batch_size, gen, rank, world), len(rows),
            -(-(len(rows) // world) // batch_size))


def in_memory_epochs(run: Run, dataset: Dataset, net: nn.Module,
                     select: dict[str, Any]) -> Plan:
    """Batches of the selected rows with their soft targets held in memory (a view set: each
    epoch's stored views, replayed)."""
    ts, opts = run.ts, run.opts  # a transfer set's run: ts and temperature are set
    batch_size, gen, rank, world = opts.batch_size, run.gen, run.rank, run.world
    rows = selected_rows(ts, select)
    check_length(dataset, ts)
    examples = ts.index()[rows]
    cached = Cached(dataset, np.unique(examples))  # reads only the examples it trains on
    check_outputs(net, cached.x[:1].to(run.dev), ts, cached.y)
    sds = SoftTargetDataset(cached, ts, temperature=run.temperature, rows=rows,
                            seed=select["seed"], trust_code=opts.trust_code)
    targets = list(sds.targets) if isinstance(sds.targets, tuple) else [sds.targets]
    pos = torch.tensor([cached.pos[int(i)] for i in examples], dtype=torch.long)
    if sds.transform is None:
        tensors = [cached.x[pos], sds.labels, *targets]  # all in the order of `rows`
        return (lambda epoch: _batches(tensors, batch_size, gen, rank, world), len(rows),
                -(-(len(rows) // world) // batch_size))
    # a view set: each epoch replays stored views of the examples, not the examples
    per_epoch = min(opts.views_per_epoch, ts.layout.views)
    n_rows = len(np.unique(examples)) * per_epoch
    return (lambda epoch: _view_batches(run, sds, cached.x, [pos, sds.labels, *targets],
                                        examples, per_epoch,
                                        np.random.default_rng([select["seed"], epoch])),
            n_rows, -(-(n_rows // world) // batch_size))


class StreamedEpochs:
    """The batches of each epoch of a streamed set (`SoftTargetBatches.loader()`), from its
    first batch or, resuming, from where a saved `state_dict()` stopped."""

    def __init__(self, stream: SoftTargetBatches, loader: Any) -> None:
        self.stream, self.loader = stream, loader

    def __call__(self, epoch: int, resume: dict[str, int] | None = None,
                 ) -> Iterator[list[torch.Tensor]]:
        self.stream.set_epoch(epoch)
        if resume is not None:
            self.stream.load_state_dict(resume)
        return iter(self.loader)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()


def streamed_epochs(run: Run, dataset: Dataset, net: nn.Module,
                    select: dict[str, Any]) -> Plan:
    """Whole batches straight from whole checked blocks, shuffled across windows that span the
    set; every rank takes `steps_per_epoch` steps (the longer ranks' tails dropped), in an
    order that `--loader-workers` (DataLoader workers) does not change."""
    ts, dev = run.ts, run.dev  # a transfer set's run: ts and temperature are set
    rows = selected_rows(ts, select)
    stream = SoftTargetBatches(dataset, ts, temperature=run.temperature,
                               batch_size=run.opts.batch_size, rows=rows, seed=select["seed"],
                               rank=run.rank, world_size=run.world)
    x0 = split_item(dataset[int(ts.index()[rows[0]])])[0]
    check_outputs(net, x0[None].to(dev), ts, torch.zeros(0))
    loader = stream.loader(num_workers=run.opts.loader_workers, pin_memory=dev.type == "cuda")
    return StreamedEpochs(stream, loader), len(rows), stream.steps_per_epoch(0)



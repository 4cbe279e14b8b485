"""Augmented views (docs/FORMAT.md, "View sets"): each row of a set may describe one random view of
an example, replayed exactly from its seed, so the student trains on the very image the teacher
labelled.

SPEC is a comma-separated list of torchvision.transforms.v2 steps, applied in order:
  random-crop:PAD      shift by up to PAD pixels (pad PAD, crop back to the input size)
  hflip                flip left-right with probability 0.5
  resized-crop:SMIN    crop a random area in [SMIN, 1] of the image, resize to the input size
  color-jitter:S       brightness and contrast jitter of strength S
or python:package.module:factory, a function returning a transform (tensor -> tensor) that
draws its randomness from torch's global generator. A `python:` augmentation read back from a
set's metadata is code from a file: it runs only with `trust_code` (see specs.require_trusted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import xxhash
from torch.utils.data import Dataset

from softlabels.errors import SpecError
from softlabels.sources.arrays import hashed_item, split_item
from softlabels.specs import import_factory, require_trusted

AUGMENT_FORMS = ("random-crop:PAD", "hflip", "resized-crop:SCALE_MIN", "color-jitter:S",
                 "python:package.module:factory")
Transform = Callable[[torch.Tensor], torch.Tensor]


def _step(item: str, size: tuple[int, int]) -> Any:
    from torchvision.transforms import v2

    name, _, arg = item.partition(":")
    try:
        if name == "random-crop":
            return v2.RandomCrop(size, padding=int(arg))
        if name == "hflip" and not arg:
            return v2.RandomHorizontalFlip()
        if name == "resized-crop":
            return v2.RandomResizedCrop(size, scale=(float(arg), 1.0), antialias=True)
        if name == "color-jitter":
            return v2.ColorJitter(brightness=float(arg), contrast=float(arg))
    except ValueError:
        raise SpecError(f"bad value in augmentation step {item!r}; valid forms: "
                        + ", ".join(AUGMENT_FORMS)) from None
    raise SpecError(f"unknown augmentation step {item!r}; valid forms: " + ", ".join(AUGMENT_FORMS))


def build_augment(spec: str, example: torch.Tensor, *, trust_code: bool = False,
                  source: str = "the transfer set's augment") -> Transform:
    """The transform SPEC names, for inputs shaped like `example` (C, H, W).

    `python:` specs run code: only with `trust_code` (the user named the spec, or opted in to
    the code named by `source`)."""
    require_trusted(spec, source, trust_code)
    if spec.startswith("python:"):
        transform = import_factory(spec[len("python:"):], spec)()
        if not callable(transform):
            raise SpecError(f"{spec!r} did not return a callable transform")
        return transform
    from torchvision.transforms import v2

    if example.dim() != 3:
        raise SpecError(f"--augment needs image inputs shaped (C, H, W); these are "
                        f"{tuple(example.shape)}")
    size = (int(example.shape[-2]), int(example.shape[-1]))
    return v2.Compose([_step(item.strip(), size) for item in spec.split(",") if item.strip()])


def view_seed(base: int, example: int, view: int) -> int:
    """The seed of view `view` of example `example`: a function of those numbers alone, so it
    does not depend on batch size, worker count, order or subset."""
    return xxhash.xxh3_64_intdigest(f"{base}:{example}:{view}".encode())


def replay(transform: Transform, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The view of `x` drawn with `seed`; the global generator is left as it was.

    Seeds the CPU default generator alone: `torch.manual_seed` also seeds every accelerator
    and cost 250 us a call here, against 4 us (measured), more than the transform itself."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed % (1 << 63))
    try:
        return transform(x)
    finally:
        generator.set_state(state)


def check_deterministic(transform: Transform, x: torch.Tensor, spec: str) -> None:
    """Refuse a transform whose view is not a function of its seed (replayed twice)."""
    for seed in (1, 2, 3):
        a, b = replay(transform, x, seed), replay(transform, x, seed)
        if not torch.equal(a, b):
            raise SpecError(f"augmentation {spec!r} is not deterministic under its seed: two "
                            "replays differ; draw randomness only from torch's generator")


class ViewDataset(Dataset):
    """Rows of a view set: row r is view r % V of example r // V, with its label, the hash of
    the un-augmented example and the view's seed. `views` > 0 and `spec` come checked from
    `PrecomputeOptions`."""

    def __init__(self, data: Dataset, views: int, spec: str, seed: int = 0) -> None:
        self.data, self.views, self.seed = data, views, seed
        # the caller names `spec` (precompute --augment): it may be python: code
        self.transform = build_augment(spec, split_item(data[0])[0], trust_code=True)
        check_deterministic(self.transform, split_item(data[0])[0], spec)

    def __len__(self) -> int:
        return len(self.data) * self.views

    def __getitem__(self, r: int) -> tuple[torch.Tensor, int, int, int]:
        i, v = divmod(r, self.views)
        x, y, h = hashed_item(self.data, i)  # the un-augmented example's hash
        s = view_seed(self.seed, i, v)
        return replay(self.transform, x, s), y, h, s


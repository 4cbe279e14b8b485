"""Image DATA sources: encoded images (JPEG, PNG, WebP, GIF) decoded with torchvision.io.

Every source is an `ImageSource`: a map-style dataset over encoded files whose subclasses say
only how to read example i's bytes, its name (for error messages) and its label. Items are
(image, label): the decoded uint8 image (3, H, W) when the spec gives no transform options
(`raw_images` True: stage one applies the teacher's preprocessing), else the float32 output of
the spec's `Preprocess` (`resize=`, `crop=`, `mean=`, `std=`, `interpolation=`; `size=N` is
resize=N&crop=N).

The sample hash of an image example is the XXH3 of its *encoded* bytes: the same example has
the same hash whatever decodes it (libjpeg-turbo on CPU workers, nvJPEG on a GPU) and whatever
transform a student applies, so a student at another resolution joins a set by index and still
has its rows checked.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from softlabels.errors import DataError, SpecError
from softlabels.format.schema import sample_hash
from softlabels.preprocessing import OPTION_NAMES, Preprocess
from softlabels.safe_read import read_input

log = logging.getLogger(__name__)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io decodes
# an encoded image a classifier reads: a 100-megapixel PNG takes a few hundred MB at most
MAX_IMAGE_BYTES = 1 << 30
BAD_IMAGE_HINT = "replace or remove it, or pass --skip-bad-images to leave it out (listed)"


def decode(data: bytes | bytearray | memoryview, where: str) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, H, W), RGB. An empty, truncated or unknown file raises
    `DataError` naming `where`."""
    image, reason = _decode(data)
    if image is None:
        raise DataError(f"cannot decode image {where}: {reason}; {BAD_IMAGE_HINT}")
    return image


def _decode(data: bytes | bytearray | memoryview) -> tuple[torch.Tensor | None, str]:
    """(image, "") or (None, why it cannot be decoded)."""
    from torchvision.io import ImageReadMode, decode_image

    if len(data) == 0:
        return None, "the file is empty"
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:  # torchvision: "fn, file:line, reason"
        return None, (str(exc).splitlines()[0].rsplit(", ", 1)[-1] if str(exc) else
                      "unreadable")
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        return None, f"decoded to shape {tuple(image.shape)}"
    return image, ""


class ImageSource(Dataset):
    """Encoded images with labels. Subclasses set `classes` and implement `__len__`,
    `read(i) -> bytes`, `name(i) -> str` and `label(i) -> int`."""

    classes: list[str]
    preprocess: Preprocess | None = None
    encoded: bool = False  # yield the encoded bytes (decoding happens on a device later)

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    @property
    def raw_images(self) -> bool:
        """True when items are decoded uint8 images, not preprocessed float tensors."""
        return self.preprocess is None

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} is outside the {len(self)} images")
        return i

    def decode(self, i: int) -> torch.Tensor:
        """Example i's image, uint8 (3, H, W)."""
        i = self._check_index(i)
        return decode(self.read(i), self.name(i))

    def hashed_item(self, i: int) -> tuple[torch.Tensor, int, int]:
        """(input, label, sample hash of the encoded bytes), reading the file once."""
        i = self._check_index(i)
        data = self.read(i)
        digest = sample_hash(np.frombuffer(data, dtype=np.uint8))
        if self.encoded:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), self.label(i), digest
        image = decode(data, self.name(i))
        return (image if self.preprocess is None else self.preprocess(image)), self.label(i), \
            digest

    def example_hash(self, i: int) -> int:
        """The sample hash of example i without decoding it."""
        i = self._check_index(i)
        return sample_hash(np.frombuffer(self.read(i), dtype=np.uint8))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y, _ = self.hashed_item(i)
        return x, y

    def with_preprocess(self, preprocess: Preprocess | None) -> ImageSource:
        """The same images with another preprocessing (None: decoded uint8 images)."""
        other = copy.copy(self)
        other.preprocess = preprocess
        return other

    def as_encoded(self) -> ImageSource:
        """The same images as their encoded bytes (1-D uint8), for decoding on a device."""
        other = copy.copy(self)
        other.encoded = True
        return other


class KeptExamples(Dataset):
    """An image source less the examples that cannot be decoded: example i here is example
    `kept[i]` of `source`; `skipped` lists the others ({index, name, reason})."""

    def __init__(self, source: ImageSource, kept: np.ndarray,
                 skipped: list[dict[str, Any]]) -> None:
        self.source, self.kept, self.skipped = source, kept, skipped
        self.classes = source.classes
        if hasattr(source, "targets"):
            self.targets = [source.targets[k] for k in kept]

    def __len__(self) -> int:
        return len(self.kept)

    @property
    def raw_images(self) -> bool:
        return self.source.raw_images

    @property
    def preprocess(self) -> Preprocess | None:
        return self.source.preprocess

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.source[int(self.kept[i])]

    def hashed_item(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.source.hashed_item(int(self.kept[i]))

    def example_hash(self, i: int) -> int:
        return self.source.example_hash(int(self.kept[i]))

    def with_preprocess(self, preprocess: Preprocess | None) -> KeptExamples:
        return KeptExamples(self.source.with_preprocess(preprocess), self.kept, self.skipped)

    def as_encoded(self) -> KeptExamples:
        return KeptExamples(self.source.as_encoded(), self.kept, self.skipped)


class _Decodable(Dataset):
    """(i, why example i cannot be decoded, or "") for the checking pass."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, str]:
        try:
            return i, _decode(self.source.read(i))[1]
        except DataError as exc:  # the file itself cannot be read
            return i, str(exc).split("; ")[0]


def keep_decodable(data: Dataset, num_workers: int = 0) -> KeptExamples:
    """`--skip-bad-images`: decode every image once (in `num_workers` DataLoader workers) and
    keep those that decode. This costs a full decoding pass before the teacher runs, and buys
    a set whose rows are all real teacher outputs, laid out before the first is computed."""
    from torch.utils.data import DataLoader

    if not isinstance(data, ImageSource):
        raise DataError("--skip-bad-images applies to image DATA (imagefolder:, hfds:, wds:); "
                        f"this dataset is a {type(data).__name__}: drop the option")
    kept, skipped = [], []
    loader = DataLoader(_Decodable(data), batch_size=64, num_workers=num_workers,
                        collate_fn=list)
    for batch in loader:
        for i, reason in batch:
            if reason:
                skipped.append({"index": i, "name": data.name(i), "reason": reason})
                log.warning("skipping image %s: %s", data.name(i), reason)
            else:
                kept.append(i)
    if not kept:
        raise DataError(f"none of the {len(data)} images decodes (first: {skipped[0]['name']}: "
                        f"{skipped[0]['reason']}); check the DATA spec")
    return KeptExamples(data, np.array(kept, dtype=np.int64), skipped)


def model_inputs(data: Dataset) -> Dataset:
    """Stage two's view of a dataset: raw decoded images become float32 in [0, 1] (the
    student's own transform, if any, is the DATA spec's); any other dataset is returned as is."""
    if isinstance(data, (ImageSource, KeptExamples)) and data.raw_images:
        return data.with_preprocess(Preprocess())
    return data


def preprocess_from(options: dict[str, Any], spec: str) -> Preprocess | None:
    """The DATA spec's transform options (popped from `options`) as a Preprocess, or None
    when there are none. `size=N` is the older resize=N&crop=N."""
    if "size" in options:
        size = options.pop("size")
        if "resize" in options or "crop" in options:
            raise SpecError(f"{spec!r}: give size= or resize=/crop=, not both")
        options["resize"], options["crop"] = size, size
    if not any(k in options for k in OPTION_NAMES):
        return None
    return Preprocess().with_options(options)


def refuse_unknown(options: dict[str, Any], allowed: tuple[str, ...], spec: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SpecError(f"unknown options {unknown} in {spec!r}; valid: "
                        + ", ".join(allowed + OPTION_NAMES + ("size",)))


# --- imagefolder:DIR ---------------------------------------------------------------------------


class ImageFolderSource(ImageSource):
    """DIR/CLASS/.../IMAGE, in torchvision ImageFolder's order: classes are the sorted
    sub-folder names, files sorted within each walked folder; label = the class's position."""

    def __init__(self, root: str | os.PathLike[str], preprocess: Preprocess | None = None
                 ) -> None:
        self.root = Path(root)
        self.preprocess = preprocess
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                self.samples += [(os.path.join(folder, f), label) for f in sorted(files)
                                 if f.lower().endswith(EXTENSIONS)]
        if not self.samples:
            raise DataError(f"no images under {self.root} (looked for "
                            f"{', '.join(EXTENSIONS)} files in class folders); lay it out as "
                            "DIR/CLASS/IMAGE")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> bytes:
        path = self.samples[i][0]
        try:  # a fifo or a link to /dev/zero in the folder is refused, not read without end
            return read_input(path, "image", limit=MAX_IMAGE_BYTES)
        except DataError as exc:
            raise DataError(f"{str(exc).split('; ')[0]}; {BAD_IMAGE_HINT}") from None
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror or exc}; "
                            f"{BAD_IMAGE_HINT}") from None

    def name(self, i: int) -> str:
        return self.samples[i][0]

    def label(self, i: int) -> int:
        return self.samples[i][1]


def image_folder(body: str, options: dict[str, Any], spec: str) -> ImageFolderSource:
    preprocess = preprocess_from(options, spec)
    refuse_unknown(options, (), spec)
    if not Path(body).is_dir():
        raise DataError(f"no such directory {body!r} (from {spec!r}); check the path")
    return ImageFolderSource(body, preprocess)


# --- decoding on a device ----------------------------------------------------------------------


def decode_batch(encoded: list[torch.Tensor], device: str | torch.device,
                 preprocess: Preprocess) -> torch.Tensor:
    """Encoded images (1-D uint8 each) -> preprocessed float32 (B, 3, h, w) on `device`:
    JPEGs decoded there in one batched call (nvJPEG), others on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    jpeg = [bool(e.numel() > 2 and e[0] == 0xFF and e[1] == 0xD8) for e in encoded]
    images: list[Any] = [None] * len(encoded)
    picks = [i for i, j in enumerate(jpeg) if j]
    if picks:
        for i, img in zip(picks, decode_jpeg([encoded[i] for i in picks], device=device,
                                             mode=ImageReadMode.RGB)):
            images[i] = img
    for i in (i for i, j in enumerate(jpeg) if not j):
        images[i] = decode_image(encoded[i], mode=ImageReadMode.RGB).to(device)
    return stack_images([preprocess(img) for img in images])


def stack_images(images: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Stack one batch of images; images of different sizes are refused in one line."""
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(f"images of different sizes in one batch ({'x'.join(map(str, a))} and "
                        f"{'x'.join(map(str, b))}): give the DATA spec a size, e.g. "
                        "imagefolder:DIR?resize=256&crop=224, or a teacher with its own "
                        "preprocessing")
    return torch.stack(list(images))

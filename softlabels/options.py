"""The options of stage one and stage two: one typed, frozen object per command, each default
written once here and every value checked once, when the object is made (nanoGPT's GPTConfig).

The CLI builds these objects from its flags (its choices come from the same constants), the
library functions build them from their keyword arguments; nothing below them checks again.
Bad values raise `OptionError`, which is also a `ValueError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from softlabels.errors import OptionError
from softlabels.format.schema import COMBINE_CHOICES, DTYPE_CHOICES
from softlabels.format.targets import QUANTIZE_CHOICES, Hybrid
from softlabels.tempering import check_temperature

# How the mass outside a top-k target's k classes enters the loss (`sparse_kd_loss`).
TOPK_CONVENTIONS = ("residual", "zero")
TOPK_CONVENTION_HELP = (
    "residual (default): the teacher's mass outside its k classes is one more bucket, matched "
    "against the student's mass outside them (KL over k + 1 buckets); zero (DistillKit's "
    "default): the k probabilities renormalised to 1, the rest taken as 0, against the "
    "student's full softmax. zero pushes the student's mass outside the k classes to 0, and "
    "its loss is larger where the k classes hold less of the mass (high T).")


PRECISION_CHOICES = ("fp32", "bf16", "fp16")
OPTIMIZER_CHOICES = ("adam", "sgd")


def check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    """torchvision's verify_str_arg: one helper for every choice."""
    if value not in choices:
        raise OptionError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _check_int(value: Any, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise OptionError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        rule = "positive" if minimum == 1 else f"at least {minimum}"
        raise OptionError(f"{what} must be {rule}, got {value}")
    return int(value)


def _check_number(value: Any, what: str, *, low: float, high: float = math.inf,
                  low_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise OptionError(f"{what} must be finite, got {value!r}")
    if v < low or (low_open and v == low) or v > high:
        left = "(" if low_open else "["
        right = "]" if high < math.inf else ")"
        raise OptionError(f"{what} must lie in {left}{low:g}, {high:g}{right}, got {value!r}")
    return v


def check_alpha(value: Any) -> float:
    """The one alpha check (the soft term's weight): a number in [0, 1]."""
    return _check_number(value, "alpha", low=0, high=1)


def check_batch_size(value: Any) -> int:
    """The one batch-size check: a positive integer."""
    return _check_int(value, "batch size", minimum=1)


class _Options:
    def replace(self, **changes: Any) -> Any:
        """A copy with `changes`, checked again."""
        return type(self)(**{**asdict(self), **changes})  # type: ignore[call-overload]

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}  # type: ignore[arg-type]


def check_decode_device(device: str) -> None:
    """`--decode-device`: cpu (DataLoader workers) or cuda[:N], refused in one line where no
    CUDA device is visible."""
    if not isinstance(device, str) or not (device in ("cpu", "cuda")
                                           or device.startswith("cuda:")):
        raise OptionError(f"--decode-device must be cpu or cuda[:N], got {device!r}")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise OptionError(f"--decode-device {device} needs a CUDA device and none is visible "
                              "here (torch.cuda.is_available() is False); use --decode-device "
                              "cpu, which decodes in the DataLoader workers (--num-workers)")


@dataclass(frozen=True)
class PrecomputeOptions(_Options):
    """How `precompute` runs the teacher and lays out the set (see `softlabels precompute`)."""

    temperatures: tuple[float, ...] = (1.0,)
    batch_size: int = 256
    dtype: str = "float16"  # storage dtype of logits
    probs_dtype: str = "float32"  # float16 probabilities underflow (docs/FORMAT.md)
    combine: str = "mean-logits"
    keep_members: bool = False
    store_inputs: bool = False
    topk: int = 0
    sample_k: int = 0
    nucleus: float = 0.0  # > 0: a hybrid set, head covering this mass, capped at topk
    tail: int = 0  # hybrid: tail classes drawn from the rest of each row's mass
    quantize: int = 0  # hybrid: 8 stores 8-bit values with a per-row step
    views: int = 0
    augment: str | None = None
    view_seed: int = 0
    chunk_rows: int = 0  # 0: about 1 MiB of logits per chunk
    shard_rows: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    num_workers: int = 0  # DataLoader worker processes
    trust_code: bool = False  # build python: specs found inside checkpoints
    random_teacher: bool = False  # accept a teacher with no trained weights (init only)
    decode_device: str = "cpu"  # where image sources' JPEGs are decoded (cpu: in the workers)
    skip_bad_images: bool = False  # leave undecodable images out, listed in the set's metadata

    def __post_init__(self) -> None:
        temps = self.temperatures
        if isinstance(temps, (int, float, str)):
            temps = (temps,)
        temps = tuple(check_temperature(t, "temperatures") for t in temps)
        if not temps:
            raise OptionError("temperatures must name at least one temperature, e.g. 1,4,20")
        if len(set(temps)) != len(temps):
            dup = sorted({t for t in temps if temps.count(t) > 1})
            raise OptionError(f"temperatures must differ, got {list(temps)} ({dup[0]:g} twice);"
                              " give each temperature once")
        object.__setattr__(self, "temperatures", temps)
        check_batch_size(self.batch_size)
        check_choice(self.dtype, DTYPE_CHOICES, "dtype")
        check_choice(self.probs_dtype, DTYPE_CHOICES, "probs dtype")
        check_choice(self.combine, COMBINE_CHOICES, "combine")
        check_choice(self.precision, PRECISION_CHOICES, "precision")
        for name in ("topk", "sample_k", "views", "view_seed", "chunk_rows", "num_workers"):
            _check_int(getattr(self, name), f"--{name.replace('_', '-')}", minimum=0)
        if self.shard_rows is not None:
            _check_int(self.shard_rows, "--shard-rows", minimum=1)
        if self.topk and self.sample_k:
            raise OptionError("--topk and --sample-k are two sparse layouts: choose one, not both")
        self._check_hybrid()
        if self.topk and self.combine == "mean-probs":
            raise OptionError("--topk stores logits and their normalisers, exact under "
                              "mean-logits only; use --combine mean-logits or --sample-k")
        if bool(self.views) != bool(self.augment):
            raise OptionError(f"--views must be positive and come with --augment SPEC "
                              f"(got views {self.views}, augment {self.augment!r})")
        if self.views and self.store_inputs:
            raise OptionError("--store-inputs stores un-augmented inputs; drop --views, or "
                              "drop --store-inputs and keep the DATA")
        if not isinstance(self.device, str) or not self.device:
            raise OptionError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        check_decode_device(self.decode_device)

    def _check_hybrid(self) -> None:
        _check_int(self.tail, "--tail", minimum=0)
        _check_int(self.quantize, "--quantize", minimum=0)
        if self.nucleus == 0 and not (self.tail or self.quantize):
            return
        if not self.nucleus:
            raise OptionError("--tail and --quantize make a hybrid set: give --nucleus P too "
                              "(P = 1 keeps a plain top-K head)")
        _check_number(self.nucleus, "--nucleus", low=0, high=1, low_open=True)
        if self.quantize not in QUANTIZE_CHOICES:
            raise OptionError(f"--quantize must be 0 (off) or 8 (bits), got {self.quantize}")
        if not self.topk or self.sample_k:
            raise OptionError("--nucleus needs --topk K, the head's cap and width, and no "
                              "--sample-k (the tail is the hybrid's own sample)")
        if self.combine == "mean-probs":
            raise OptionError("--nucleus stores logits and their normalisers, exact under "
                              "mean-logits only; use --combine mean-logits")

    def sparse_args(self) -> dict[str, Any]:
        """The Layout fields of the chosen target kind: topk, sample_k and hybrid."""
        if not self.nucleus:
            return {"topk": self.topk, "sample_k": self.sample_k, "hybrid": None}
        return {"topk": 0, "sample_k": 0, "hybrid": Hybrid(
            k=self.topk, nucleus=float(self.nucleus), tail=self.tail, quantize=self.quantize)}

    def layout_args(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if k not in ("num_workers", "trust_code", "random_teacher", "decode_device",
                             "skip_bad_images")}


@dataclass(frozen=True)
class TrainOptions(_Options):
    """How `train_student` trains (see `softlabels train`). `temperature` and `alpha` are the
    distillation's and need a transfer set; None means the set's first stored T and 0.9."""

    temperature: float | None = None
    alpha: float | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    fraction: float | None = None
    classes: tuple[int, ...] | None = None
    exclude_classes: tuple[int, ...] | None = None
    jitter_pixels: int = 0
    device: str = "auto"
    distributed: bool = False
    views_per_epoch: int = 1
    topk_loss: str = "residual"  # how a top-k set's missing mass enters the loss (losses.py)
    trust_code: bool = False  # build python: specs found inside checkpoints and sets
    loader_workers: int = 0  # DataLoader workers of a streamed set (the batches do not change)
    state_every: int = 0  # steps between mid-epoch states of a streamed run (0: epoch ends)

    def __post_init__(self) -> None:
        check_choice(self.topk_loss, TOPK_CONVENTIONS, "--topk-loss")
        if self.temperature is not None:
            object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_alpha(self.alpha))
        _check_int(self.epochs, "epochs", minimum=1)
        check_batch_size(self.batch_size)
        _check_number(self.lr, "learning rate", low=0, low_open=True)
        _check_number(self.weight_decay, "weight decay", low=0)
        check_choice(self.optimizer, OPTIMIZER_CHOICES, "optimizer")
        _check_int(self.seed, "seed", minimum=0)
        if self.fraction is not None:
            _check_number(self.fraction, "--fraction", low=0, high=1, low_open=True)
        _check_int(self.jitter_pixels, "--jitter", minimum=0)
        _check_int(self.views_per_epoch, "--views-per-epoch", minimum=1)
        _check_int(self.loader_workers, "--loader-workers", minimum=0)
        _check_int(self.state_every, "--state-every", minimum=0)
        for name in ("classes", "exclude_classes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(c) for c in value))
        if not isinstance(self.device, str) or not self.device:
            raise OptionError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def check_distillation(self, has_transfer_set: bool) -> None:
        """Refuse distillation options without a transfer set: they would be ignored."""
        if has_transfer_set:
            return
        given = [f"--{n}" for n in ("temperature", "alpha") if getattr(self, n) is not None]
        if given:
            raise OptionError(f"{' and '.join(given)} set the distillation, which needs "
                              "--transfer-set TS; without one, training uses hard labels")


def check_output_file(path: str | os.PathLike[str], what: str = "--out", *,
                      directory_ok: bool = False, checkpoint: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work: a directory (unless
    `directory_ok`: a Zarr set is one), a path under a file, or a folder it cannot write in;
    with `checkpoint`, an existing file that is not a torch-saved checkpoint (a transfer set,
    the DATA), which writing the checkpoint would replace. A URL: its optional package must be
    installed and its scheme writable (not http)."""
    from pathlib import Path

    from softlabels.format.location import Remote, is_url

    if is_url(path):
        remote = Remote(path)
        remote.require_prefix()
        if remote.read_only:
            raise OptionError(f"{what} {remote}: {remote.scheme}:// is read-only; write to a "
                              "local path, s3:// or gs://")
        from softlabels.format.backends import backend_of

        if backend_of(remote.url) != "zarr":
            raise OptionError(f"{what} {remote}: only Zarr sets are written to a URL (an object "
                              "store cannot rewrite part of a file); name a `.zarr` set")
        bucket = remote.key.split("/", 1)[0]
        fs = remote.fs  # refuses, naming the extra, when its package is missing
        try:
            fs.info(bucket)
        except (FileNotFoundError, PermissionError):
            raise OptionError(f"{what} {remote}: the bucket {bucket} does not exist, or these "
                              "credentials cannot see it; create it, or check the credentials "
                              "and the endpoint (AWS_ENDPOINT_URL, ~/.aws)") from None
        except Exception as exc:  # an endpoint that does not answer (botocore, aiohttp, ...)
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise OptionError(f"{what} {remote}: cannot reach the store ({type(exc).__name__}: "
                              f"{first}); check the network and the endpoint "
                              "(AWS_ENDPOINT_URL, ~/.aws)") from None
        return
    p = Path(path)
    if p.is_dir() and not directory_ok:
        raise OptionError(f"{what} {p} is a directory; name a file, e.g. {p / 'model.pt'}")
    if checkpoint and p.is_file() and not _torch_saved(p):
        raise OptionError(f"{what} {p} exists and is not a checkpoint (training would replace "
                          "it); choose another path, or remove the file first")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"{what} {p} lies under {parent}, which is a file, not a directory;"
                          " choose another path")
    import tempfile

    try:  # a real probe: os.access says yes to root on a read-only filesystem
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OptionError(f"{what} {p}: cannot write in {parent} ({exc.strerror}); choose a "
                          "writable directory") from None


def _torch_saved(path: os.PathLike[str]) -> bool:
    """Whether `path` is a `torch.save` file (a zip archive holding `<name>/data.pkl`), as
    every checkpoint and resume state is, unlike a transfer set or DATA (an .npz is a zip
    without it)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False

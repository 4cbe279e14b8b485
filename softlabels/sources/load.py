"""The dataset a DATA spec names (README, docs/DATA.md, docs/TEXT.md)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from softlabels.errors import DataError, SpecError
from softlabels.sources.arrays import NpzDataset, torchvision_dataset
from softlabels.specs import DATA_FORMS, import_factory, parse_spec


def load_data(spec: str) -> Dataset:
    """Build the dataset a DATA spec names. Items are (input tensor, label or -1)."""
    scheme, body, options = parse_spec(spec, DATA_FORMS, "DATA")
    if scheme == "npz":
        if not Path(body).exists():
            raise DataError(f"no such file {body!r} (from {spec!r}); check the path")
        if not Path(body).is_file():  # a fifo would be waited on, a device read without end
            raise DataError(f"{body!r} (from {spec!r}) is not a regular file (a fifo, a device "
                            "or a folder); give the path of the .npz itself")
        return NpzDataset(body)
    if scheme == "mnist":
        return torchvision_dataset("MNIST", body, options, spec)
    if scheme == "torchvision":
        return torchvision_dataset(body, str(options.pop("root", ".")), options, spec)
    if scheme == "imagefolder":
        from softlabels.sources.images import image_folder

        return image_folder(body, options, spec)
    if scheme == "hfds":
        from softlabels.sources.hf_images import hf_images

        return hf_images(body, options, spec)
    if scheme == "wds":
        from softlabels.sources.shards import tar_shards

        return tar_shards(body, options, spec)
    if scheme == "transferset":
        from softlabels.format.reader import TransferSetInputs

        return TransferSetInputs(body)
    if scheme == "tokens":
        from softlabels.sources.token_files import load_tokens

        return load_tokens(body, options, spec)
    if scheme == "text":
        from softlabels.sources.text import load_text

        return load_text(body, options, spec)
    if scheme == "python":
        data = import_factory(body, spec)(**options)
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise SpecError(f"{spec!r} returned {type(data).__name__}, not a map-style Dataset")
        return data
    raise SpecError(f"unknown DATA scheme {scheme!r} in {spec!r}; valid forms: "
                    + ", ".join(DATA_FORMS))

"""A stand-in for an image DATA source (imagefolder:, hfds:, wds:) in the teacher tests:
decoded uint8 images (3, H, W) from files, with `raw_images = True` and `classes`, named
through `python:raw_image_data:folder?root=DIR`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset


class RawImages(Dataset):
    raw_images = True

    def __init__(self, root: str) -> None:
        self.files = sorted(p for p in Path(root).iterdir() if p.suffix in (".jpg", ".png"))
        self.classes = ["even", "odd"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(str(self.files[i]), mode=ImageReadMode.RGB), i % 2


def folder(root: str) -> RawImages:
    return RawImages(root)


class Unnamed(RawImages):
    """The same images with no class names."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        del self.classes


def unnamed(root: str) -> Unnamed:
    return Unnamed(root)

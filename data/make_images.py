"""Rebuild data/images/: six small real photographs (three classes of two; see README.md) cut
from scikit-image's bundled public-domain / CC0 photographs and re-encoded.

    python data/make_images.py [OUT_DIR]      (default: data/images)

Also the generator behind benchmarks/jpeg_stage_one.py: `photo_crops` cuts N ImageNet-like
JPEGs (about 500x375) from the same photographs with seeded random crops, scales and flips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")  # see README.md

# (class folder, file, photo, top, left, crop height, crop width, out height, out width)
TINY = (
    ("cat", "chelsea_0.jpg", "chelsea", 20, 60, 240, 320, 60, 80),
    ("cat", "chelsea_1.png", "chelsea", 0, 100, 300, 300, 48, 48),
    ("cup", "coffee_0.jpg", "coffee", 40, 100, 300, 400, 72, 96),
    ("cup", "coffee_1.jpg", "coffee", 0, 0, 400, 600, 50, 75),
    ("rocket", "rocket_0.jpg", "rocket", 0, 160, 427, 320, 80, 60),
    ("rocket", "rocket_1.png", "rocket", 100, 200, 200, 200, 40, 40),
)


def photo(name: str) -> torch.Tensor:
    """One of skimage.data's photographs, uint8 (3, H, W)."""
    import skimage.data

    return torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)())).permute(2, 0, 1)


def cut(image: torch.Tensor, top: int, left: int, h: int, w: int, out_h: int,
        out_w: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    region = image[:, top:top + h, left:left + w]
    return F.resize(region, [out_h, out_w], antialias=True).contiguous()


def encode(image: torch.Tensor, suffix: str, quality: int = 90) -> bytes:
    from torchvision.io import encode_jpeg, encode_png

    data = encode_png(image) if suffix == ".png" else encode_jpeg(image, quality=quality)
    return data.numpy().tobytes()


def make_tiny(out: Path) -> None:
    for folder, name, source, *box in TINY:
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / name).write_bytes(encode(cut(photo(source), *box), Path(name).suffix))


def photo_crops(n: int, out: Path, *, seed: int = 0, size: tuple[int, int] = (375, 500),
                quality: int = 90) -> list[Path]:
    """n JPEGs of `size` (height, width; portrait ones transposed) under out/CLASS/, one class
    per source photograph: a random crop of 30-100% of the photo's shorter side, scaled to the
    output size, flipped half the time, JPEG quality `quality`."""
    rng = np.random.default_rng(seed)
    photos = {name: photo(name) for name in PHOTOS}
    paths = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        image = photos[name]
        _, h, w = image.shape
        out_h, out_w = size if rng.random() < 0.8 else size[::-1]
        scale = rng.uniform(0.3, 1.0)
        ch = max(8, int(min(h, w * out_h / out_w) * scale))
        cw = max(8, int(ch * out_w / out_h))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        x = cut(image, top, left, ch, cw, out_h, out_w)
        if rng.random() < 0.5:
            x = x.flip(-1).contiguous()
        path = out / name / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(x, ".jpg", quality))
        paths.append(path)
    return paths


if __name__ == "__main__":
    make_tiny(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images")

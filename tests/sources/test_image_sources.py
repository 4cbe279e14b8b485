"""Image DATA sources over real photographs (data/images): imagefolder:, hfds:, wds:, their
preprocessing options, the sample hash of the encoded file, and bad images."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from softlabels.errors import DataError, OptionError, SpecError
from softlabels.format.schema import sample_hash
from softlabels.options import PrecomputeOptions
from softlabels.sources.images import ImageFolderSource, keep_decodable, model_inputs
from softlabels.sources.load import load_data
from softlabels.sources.shards import expand_braces

IMAGES = ROOT / "data" / "images"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def files() -> list[Path]:
    return [Path(p) for p, _ in ImageFolderSource(IMAGES).samples]


def test_imagefolder_classes_order_and_labels_as_torchvision() -> None:
    from torchvision.datasets import ImageFolder

    data = load_data(f"imagefolder:{IMAGES}")
    reference = ImageFolder(str(IMAGES))
    assert data.classes == reference.classes == ["cat", "cup", "rocket"]
    assert data.samples == reference.samples
    assert data.raw_images and len(data) == 6
    for i in range(len(data)):
        x, y = data[i]
        assert x.dtype == torch.uint8 and x.shape[0] == 3 and y == reference.targets[i]


@pytest.mark.parametrize("path", files(), ids=lambda p: p.name)
def test_decoded_pixels_equal_pils(path: Path) -> None:
    data = load_data(f"imagefolder:{IMAGES}")
    x = data[[p for p, _ in data.samples].index(str(path))][0]
    pil = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert x.shape == pil.shape
    diff = (x.int() - pil.int()).abs()
    if path.suffix == ".png":
        assert int(diff.max()) == 0
    else:  # two JPEG decoders: IDCT and upsampling may differ by a level or two
        assert float(diff.float().mean()) < 1.0 and int(diff.max()) <= 8


def test_spec_preprocessing_equals_torchvisions_transforms() -> None:
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    mean, std = ",".join(map(str, MEAN)), ",".join(map(str, STD))
    data = load_data(f"imagefolder:{IMAGES}?resize=40&crop=32&mean={mean}&std={std}"
                     "&interpolation=bicubic")
    reference = v2.Compose([v2.Resize(40, interpolation=v2.InterpolationMode.BICUBIC,
                                      antialias=True),
                            v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(MEAN, STD)])
    assert not data.raw_images
    for i, (path, _) in enumerate(data.samples):
        x, _ = data[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        torch.testing.assert_close(x, reference(decode_image(path)), rtol=0, atol=1e-6)
    # size=N is resize=N&crop=N, as before
    old = load_data(f"imagefolder:{IMAGES}?size=24")[0][0]
    torch.testing.assert_close(old, load_data(f"imagefolder:{IMAGES}?resize=24&crop=24")[0][0])


def test_hash_covers_the_encoded_file_whatever_the_transform() -> None:
    raw = load_data(f"imagefolder:{IMAGES}")
    small = load_data(f"imagefolder:{IMAGES}?resize=20&crop=16")
    for i, (path, _) in enumerate(raw.samples):
        expected = sample_hash(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8))
        assert raw.example_hash(i) == small.example_hash(i) == expected
        assert raw.hashed_item(i)[2] == small.hashed_item(i)[2] == expected
    # stage two reads raw images as float [0, 1]
    scaled = model_inputs(raw)[0][0]
    torch.testing.assert_close(scaled, raw[0][0].float() / 255)


def test_bad_options_and_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unknown options"):
        load_data(f"imagefolder:{IMAGES}?colour=red")
    with pytest.raises(SpecError, match="interpolation"):
        load_data(f"imagefolder:{IMAGES}?resize=8&interpolation=lanczos9")
    with pytest.raises(DataError, match="no images under"):
        load_data(f"imagefolder:{tmp_path}")


# --- bad images -----------------------------------------------------------------------------


def broken_folder(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    shutil.copytree(IMAGES, root)
    bad = root / "cup" / "coffee_0.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    return root, bad


def test_truncated_jpeg_is_one_line_naming_the_file(tmp_path: Path) -> None:
    root, bad = broken_folder(tmp_path)
    data = load_data(f"imagefolder:{root}")
    index = [p for p, _ in data.samples].index(str(bad))
    with pytest.raises(DataError) as err:
        data[index]
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "truncated" in message
    assert "--skip-bad-images" in message


def test_keep_decodable_lists_what_it_leaves_out(tmp_path: Path) -> None:
    root, bad = broken_folder(tmp_path)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    data = load_data(f"imagefolder:{root}")
    kept = keep_decodable(data)
    names = [s["name"] for s in kept.skipped]
    assert sorted(names) == sorted([str(bad), str(root / "cat" / "empty.jpg")])
    assert len(kept) == len(data) - 2 and all(s["reason"] for s in kept.skipped)
    good = [i for i in range(len(data)) if data.name(i) not in names]
    assert kept.kept.tolist() == good
    assert kept.example_hash(0) == data.example_hash(good[0])
    assert kept.targets == [data.targets[i] for i in good]


def test_decode_device_cuda_is_refused_without_a_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(OptionError, match="--decode-device cuda needs a CUDA device"):
        PrecomputeOptions(decode_device="cuda")
    with pytest.raises(OptionError, match="cpu or cuda"):
        PrecomputeOptions(decode_device="gpu")


# --- tar shards -------------------------------------------------------------------------------


def write_shards(tmp_path: Path, per_shard: int = 4) -> str:
    """The data/images examples, in imagefolder order, as webdataset shards with .cls labels
    (and one member of another kind, ignored)."""
    source = ImageFolderSource(IMAGES)
    shards = [source.samples[i:i + per_shard] for i in range(0, len(source), per_shard)]
    for s, samples in enumerate(shards):
        with tarfile.open(tmp_path / f"train-{s:03d}.tar", "w") as tar:
            for k, (path, label) in enumerate(samples):
                key = f"sample{s:03d}{k:03d}"
                ext = Path(path).suffix.lstrip(".")
                for name, data in ((f"{key}.{ext}", Path(path).read_bytes()),
                                   (f"{key}.cls", str(label).encode()),
                                   (f"{key}.meta.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(tmp_path / f"train-{{000..{len(shards) - 1:03d}}}.tar")


def test_expand_braces() -> None:
    assert expand_braces("a-{008..011}.tar") == [f"a-{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    with pytest.raises(SpecError):
        expand_braces("a-{3..1}.tar")


def test_wds_is_the_same_set_as_imagefolder(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path)
    shards = load_data(f"wds:{pattern}?resize=24&crop=20")
    folder = load_data(f"imagefolder:{IMAGES}?resize=24&crop=20")
    assert len(shards) == len(folder) == 6 and len(shards.shards) == 2
    for i in range(len(folder)):
        xs, ys, hs = shards.hashed_item(i)
        xf, yf, hf = folder.hashed_item(i)
        assert ys == yf and hs == hf
        torch.testing.assert_close(xs, xf, rtol=0, atol=0)
    assert "sample001001" in shards.name(5) and "train-001.tar" in shards.name(5)


def test_wds_refuses_links_and_truncated_shards(tmp_path: Path) -> None:
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="link or device"):
        load_data(f"wds:{link}")
    pattern = write_shards(tmp_path)
    first = Path(expand_braces(pattern)[0])
    first.write_bytes(first.read_bytes()[:3000])
    with pytest.raises(DataError, match="truncated|damaged"):
        load_data(f"wds:{pattern}")
    with pytest.raises(DataError, match="no such shard"):
        load_data(f"wds:{tmp_path}/none-{{0..1}}.tar")


# --- Hugging Face datasets and Parquet --------------------------------------------------------


def hf_dataset():  # noqa: ANN201  (datasets is optional)
    datasets = pytest.importorskip("datasets")
    source = ImageFolderSource(IMAGES)
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=source.classes)})
    rows = {"img": [{"bytes": Path(p).read_bytes(), "path": None} for p, _ in source.samples],
            "label": source.targets}
    return datasets.Dataset.from_dict(rows, features=features), source


def check_same_as_folder(data, source: ImageFolderSource) -> None:  # noqa: ANN001
    assert data.classes == source.classes and len(data) == len(source)
    for i in range(len(source)):
        x, y, h = data.hashed_item(i)
        xf, yf, hf = source.hashed_item(i)
        assert (y, h) == (yf, hf) and torch.equal(x, xf)


@pytest.mark.slow  # importing datasets takes seconds
def test_hfds_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds, source = hf_dataset()
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    check_same_as_folder(load_data(f"hfds:{tmp_path / 'dd'}?split=train&image=img"), source)
    with pytest.raises(DataError, match="split="):
        load_data(f"hfds:{tmp_path / 'dd'}?image=img")
    with pytest.raises(DataError, match="no column 'image'"):
        load_data(f"hfds:{tmp_path / 'dd'}?split=train")


def test_hfds_parquet(tmp_path: Path) -> None:
    ds, source = hf_dataset()
    ds.to_parquet(str(tmp_path / "part.parquet"), batch_size=4)  # row groups of 4 (not 6)
    data = load_data(f"hfds:{tmp_path / 'part.parquet'}?image=img")
    check_same_as_folder(data, source)
    assert len(data.groups) >= 1


@pytest.mark.slow  # starts two worker processes
def test_wds_in_forked_workers_reads_what_one_process_reads(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    shards = load_data(f"wds:{write_shards(tmp_path, per_shard=2)}?resize=24&crop=20")
    shards[0]  # the parent opens a shard first: the workers inherit its descriptor
    expected = [shards.hashed_item(i) for i in range(len(shards))]
    loader = DataLoader(shards, batch_size=1, num_workers=2, collate_fn=lambda b: b[0])
    for (x, y), (xe, ye, _) in zip(loader, expected, strict=True):
        assert y == ye and torch.equal(x, xe)

"""Stage one and two from the command line over real image files (data/images): a set made
over an image folder, a student at another resolution joined to it, and bad images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT
from softlabels.cli import cli
from softlabels.format.reader import open_transfer_set
from softlabels.format.schema import sample_hash
from softlabels.sources.images import ImageFolderSource
from softlabels.sources.load import load_data
from softlabels.teachers.models import load_model, mlp, save_checkpoint

IMAGES = ROOT / "data" / "images"
SIZE = "resize=20&crop=16"  # the teacher's inputs: 3 x 16 x 16 = 768 values


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def teacher(tmp_path: Path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    save_checkpoint(mlp([768, 16, 3]), path, spec="mlp:768-16-3")
    return str(path)


@pytest.mark.slow  # precompute, train and evaluate: seconds
def test_imagefolder_set_and_a_student_at_another_resolution(tmp_path: Path,
                                                             teacher: str) -> None:
    out = tmp_path / "set.zarr"
    code, stdout, err = run("precompute", "--data", f"imagefolder:{IMAGES}?{SIZE}",
                            "--teacher", teacher, "--out", str(out), "--temperatures", "1,4",
                            "--batch-size", "4", "--dtype", "float32")
    assert code == 0, err
    with open_transfer_set(out) as ts:
        assert ts.meta["class_names"] == ["cat", "cup", "rocket"]
        assert ts.index().tolist() == list(range(6))
        assert ts.labels().tolist() == ImageFolderSource(IMAGES).targets
        files = [Path(p).read_bytes() for p, _ in ImageFolderSource(IMAGES).samples]
        assert ts.sample_hash().tolist() == [sample_hash(np.frombuffer(b, dtype=np.uint8))
                                             for b in files]
        logits = ts.read("logits")
    # an independent forward pass: torchvision's decode and transforms, the model itself
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    model = load_model(teacher)[0].eval()
    tf = v2.Compose([v2.Resize(20, antialias=True), v2.CenterCrop(16),
                     v2.ToDtype(torch.float32, scale=True)])
    x = torch.stack([tf(decode_image(p)) for p, _ in ImageFolderSource(IMAGES).samples])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(np.asarray(logits)), model(x),
                                   rtol=1e-5, atol=1e-5)
    # the student sees other inputs (12 x 12), joined by index and checked by file hash
    code, stdout, err = run("train", "--data", f"imagefolder:{IMAGES}?resize=14&crop=12",
                            "--transfer-set", str(out), "--model", "mlp:432-3",
                            "--out", str(tmp_path / "student.pt"), "--epochs", "1",
                            "--batch-size", "4", "--device", "cpu")
    assert code == 0, err
    code, stdout, err = run("evaluate", "--data", f"imagefolder:{IMAGES}?resize=14&crop=12",
                            "--model", str(tmp_path / "student.pt"), "--transfer-set",
                            str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["count"] == 6 if "count" in report else True


@pytest.mark.slow  # builds a mobilenet
def test_raw_images_of_different_sizes_need_a_size(tmp_path: Path) -> None:
    from softlabels.teachers.models import build_model

    spec = "torchvision:mobilenet_v3_small?num_classes=3"  # takes any image size
    teacher = tmp_path / "any_size.pt"
    save_checkpoint(build_model(spec), teacher, spec=spec)
    code, _, err = run("precompute", "--data", f"imagefolder:{IMAGES}", "--teacher", str(teacher),
                       "--out", str(tmp_path / "s.zarr"), "--batch-size", "4")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "different sizes" in lines[0]
    assert "resize=256&crop=224" in lines[0] and "Traceback" not in err


def broken(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    shutil.copytree(IMAGES, root)
    bad = root / "cup" / "coffee_1.jpg"
    bad.write_bytes(bad.read_bytes()[:700])
    return root, bad


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_truncated_jpeg_stops_precompute_in_one_line(tmp_path: Path, teacher: str,
                                                       workers: int) -> None:
    root, bad = broken(tmp_path)
    out = tmp_path / "s.zarr"
    code, stdout, err = run("precompute", "--data", f"imagefolder:{root}?{SIZE}", "--teacher",
                            teacher, "--out", str(out), "--batch-size", "2",
                            "--num-workers", str(workers))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert str(bad) in lines[0] and "--skip-bad-images" in lines[0]
    assert "Traceback" not in err + stdout and "wrote" not in stdout
    attrs = out / "zarr.json"
    assert not attrs.exists() or '"complete"' not in attrs.read_text()


def test_skip_bad_images_lists_them_in_the_provenance(tmp_path: Path, teacher: str) -> None:
    root, bad = broken(tmp_path)
    out = tmp_path / "s.zarr"
    code, stdout, err = run("precompute", "--data", f"imagefolder:{root}?{SIZE}", "--teacher",
                            teacher, "--out", str(out), "--batch-size", "2",
                            "--skip-bad-images")
    assert code == 0, err
    data = load_data(f"imagefolder:{root}")
    gone = [p for p, _ in data.samples].index(str(bad))
    with open_transfer_set(out) as ts:
        assert ts.num_rows == 5 and ts.meta["num_examples"] == 6
        assert ts.index().tolist() == [i for i in range(6) if i != gone]
        skipped = ts.meta["dataset"]["skipped"]
        assert [(s["index"], s["name"]) for s in skipped] == [(gone, str(bad))]
        assert "truncated" in skipped[0]["reason"]
    code, stdout, err = run("verify", str(out), "--data", f"imagefolder:{root}?{SIZE}")
    assert code == 0, stdout + err
    code, stdout, err = run("precompute", "--data", "npz:nowhere.npz", "--teacher", teacher,
                            "--out", str(tmp_path / "t.zarr"), "--skip-bad-images")
    assert code == 1


def test_decoding_on_the_device_makes_the_same_set(tmp_path: Path, teacher: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The --decode-device path (encoded bytes through the workers, one batched decode, the
    preprocessing after it), run here with the CPU standing in for the GPU."""
    import importlib

    from softlabels.compute.blocks import precompute
    from softlabels.options import PrecomputeOptions
    from softlabels.sources.images import decode_batch

    data = f"imagefolder:{IMAGES}?{SIZE}"
    plain = precompute(data, [teacher], tmp_path / "cpu.zarr", batch_size=4, dtype="float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    opts = PrecomputeOptions(batch_size=4, dtype="float32", decode_device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []

    def on_cpu(encoded, device, preprocess):  # noqa: ANN001, ANN202
        calls.append(len(encoded))
        assert all(e.ndim == 1 and e.dtype == torch.uint8 for e in encoded)
        return decode_batch(encoded, torch.device("cpu"), preprocess)

    monkeypatch.setattr(importlib.import_module("softlabels.compute.examples"), "decode_batch",
                        on_cpu)
    device = precompute(data, [teacher], tmp_path / "dev.zarr", opts)
    assert calls == [4, 2] and device.num_rows == plain.num_rows == 6
    with (open_transfer_set(tmp_path / "cpu.zarr") as a,
          open_transfer_set(tmp_path / "dev.zarr") as b):
        assert a.sample_hash().tolist() == b.sample_hash().tolist()
        np.testing.assert_allclose(np.asarray(a.read("logits")), np.asarray(b.read("logits")),
                                   rtol=1e-5, atol=1e-6)


def test_a_cluster_run_refuses_skipping_and_device_decoding(tmp_path: Path, teacher: str) -> None:
    from softlabels.compute.cluster import precompute_on_cluster
    from softlabels.errors import OptionError
    from softlabels.options import PrecomputeOptions

    with pytest.raises(OptionError, match="single process"):
        precompute_on_cluster(f"imagefolder:{IMAGES}?{SIZE}", [teacher], tmp_path / "s.zarr",
                              PrecomputeOptions(skip_bad_images=True), workers=1)
    assert not (tmp_path / "s.zarr").exists()


def test_verify_replays_the_teacher_on_raw_images(tmp_path: Path) -> None:
    """A one-class folder of equal-sized images, no transform options: precompute and verify
    --teacher both feed the teacher the images scaled to [0, 1]."""
    root = tmp_path / "same" / "cup"
    root.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):  # copies of one 48x48 photograph crop
        shutil.copy(IMAGES / "cat" / "chelsea_1.png", root / name)
    torch.manual_seed(0)
    save_checkpoint(mlp([3 * 48 * 48, 3]), tmp_path / "t.pt", spec=f"mlp:{3 * 48 * 48}-3")
    data = f"imagefolder:{tmp_path / 'same'}"
    out = tmp_path / "s.zarr"
    code, _, err = run("precompute", "--data", data, "--teacher", str(tmp_path / "t.pt"),
                       "--out", str(out), "--dtype", "float32")
    assert code == 0, err
    code, stdout, err = run("verify", str(out), "--data", data, "--teacher",
                            str(tmp_path / "t.pt"), "--sample", "3")
    assert code == 0 and stdout.strip().endswith("verified"), stdout + err


@pytest.mark.slow  # a resnet18 over the photographs, and an independent forward pass
def test_a_torchvision_weights_file_over_an_image_folder(tmp_path: Path) -> None:
    """Raw images from imagefolder: through the teacher's own preprocessing (here the spec's
    overrides on a resnet18 state dict): the stored logits are torchvision's own transforms
    and model(x), and the set's hashes are the files'."""
    import torchvision
    from torchvision.io import decode_image
    from torchvision.transforms import v2

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = (f"torchvision:resnet18?weights={tmp_path / 'r18.pth'}&num_classes=3&resize=40"
            f"&crop=32&mean={','.join(map(str, mean))}&std={','.join(map(str, std))}")
    out = tmp_path / "s.zarr"
    code, _, err = run("precompute", "--data", f"imagefolder:{IMAGES}", "--teacher", spec,
                       "--out", str(out), "--dtype", "float32", "--batch-size", "4")
    assert code == 0, err
    tf = v2.Compose([v2.Resize(40, antialias=True), v2.CenterCrop(32),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    files = [p for p, _ in ImageFolderSource(IMAGES).samples]
    with torch.no_grad():
        expected = model(torch.stack([tf(decode_image(p)) for p in files]))
    with open_transfer_set(out) as ts:
        torch.testing.assert_close(torch.from_numpy(np.asarray(ts.read("logits"))), expected,
                                   rtol=1e-4, atol=1e-4)
        assert ts.sample_hash().tolist() == [
            sample_hash(np.frombuffer(Path(p).read_bytes(), dtype=np.uint8)) for p in files]
    code, stdout, err = run("verify", str(out), "--data", f"imagefolder:{IMAGES}",
                            "--teacher", spec, "--sample", "6")
    assert code == 0 and stdout.strip().endswith("verified"), stdout + err

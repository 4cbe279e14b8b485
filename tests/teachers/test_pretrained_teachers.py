"""Pretrained teachers from local files (torchvision state dicts, timm checkpoints, HF image
classifiers): loaded strictly, never downloaded, never silently random; their own
preprocessing applied to raw images, recorded, and replayed by verify (docs/TEACHERS.md)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from raw_image_data import RawImages

from conftest import ROOT, TESTS
from softlabels.cli import cli
from softlabels.format.reader import open_transfer_set
from softlabels.teachers.weights import check_hash_prefix, file_sha256, hash_prefix
from softlabels.train.datasets import check_alignment

# Shorter sides equal timm test_resnet's resize (floor(160 / 0.95) = 168), so a PIL resize in
# timm's own transform is the identity and the comparison is exact; others really resize.
SIZES = [(200, 168), (168, 230), (190, 168), (168, 168)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real photographs (scikit-image's), cut small, as JPEG and PNG files."""
    from PIL import Image

    sd = pytest.importorskip("skimage.data")

    root = tmp_path_factory.mktemp("images")
    for i, (name, size) in enumerate(zip(("astronaut", "coffee", "chelsea", "rocket"), SIZES)):
        Image.fromarray(getattr(sd, name)()).resize(size).save(
            root / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def data_spec(images: Path, factory: str = "folder") -> str:
    return f"python:raw_image_data:{factory}?root={images}"


def decoded(images: Path) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_image

    return [decode_image(str(p), mode=ImageReadMode.RGB) for p in sorted(images.iterdir())]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def precompute(images: Path, teacher: str, out: Path, *more: str,
               factory: str = "folder") -> tuple[int, str]:
    return run("precompute", "--data", data_spec(images, factory), "--teacher", teacher,
               "--out", str(out), "--dtype", "float32", *more)


def stored_logits(path: Path) -> np.ndarray:
    with open_transfer_set(path) as ts:
        return ts.logits()[np.argsort(ts.index())]


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(model.state_dict(), path)
    return model, path


# --- torchvision ------------------------------------------------------------------------------


def test_hash_prefix_is_checked_as_torch_hub_does(tmp_path: Path) -> None:
    assert hash_prefix("resnet50-11ad3fa6.pth") == "11ad3fa6"
    assert hash_prefix("/a/b/r18.pth") is None
    data = tmp_path / "x.pth"
    data.write_bytes(b"weights")
    sha = file_sha256(data)
    named = tmp_path / f"model-{sha[:8]}.pth"
    shutil.copy(data, named)
    check_hash_prefix(named, sha, "an entry")  # its own prefix: accepted
    wrong = tmp_path / f"model-{'0' if sha[0] != '0' else '1'}{sha[1:8]}.pth"
    shutil.copy(data, wrong)
    with pytest.raises(Exception, match="begins with"):
        check_hash_prefix(wrong, sha, "an entry")


def fake_entry(monkeypatch: pytest.MonkeyPatch, path: Path) -> Path:
    """torchvision's resnet18 IMAGENET1K_V1 entry, its URL's file name carrying `path`'s own
    hash prefix (the real file's hash cannot be matched by a seeded test file)."""
    from torchvision.models import ResNet18_Weights

    from softlabels.teachers import torchvision as torchvision_teacher

    real = ResNet18_Weights.IMAGENET1K_V1
    named = path.parent / f"resnet18-{file_sha256(path)[:8]}.pth"
    shutil.copy(path, named)
    class ResNet18_Weights(SimpleNamespace):  # noqa: N801  (named as torchvision's)
        pass

    entry = ResNet18_Weights(name=real.name, url=f"https://example.invalid/{named.name}",
                            meta=real.meta, transforms=real.transforms)
    monkeypatch.setattr(torchvision_teacher, "entries", lambda name: [entry])
    return named


@pytest.mark.slow  # a 224-pixel ResNet-18 over four images, then info and verify: ~15 s
def test_torchvision_entry_file_brings_preprocessing_and_class_names(
        images: Path, resnet18: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import ResNet18_Weights

    model, path = resnet18
    named = fake_entry(monkeypatch, path)
    teacher = f"torchvision:resnet18?weights={named}"
    out = tmp_path / "s.zarr"
    code, text = precompute(images, teacher, out, factory="unnamed")
    assert code == 0, text
    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()  # torchvision's own, on tensors
    with torch.no_grad():
        expected = model(torch.stack([transform(x) for x in decoded(images)])).numpy()
    # the preset resizes with torchvision.transforms (v1), softlabels with v2: on uint8 images
    # they round some pixels one level of 255 apart (measured: logits within 3e-3)
    np.testing.assert_allclose(stored_logits(out), expected, rtol=0, atol=1e-2)
    code, text = run("info", str(out), "--json")
    teacher_meta = json.loads(text)["teacher"]
    member = teacher_meta["members"][0]
    assert member["weights_sha256"] == [{"file": named.name, "sha256": file_sha256(path)}]
    assert member["weights_entry"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert teacher_meta["preprocess"] == {"resize": 256, "crop": 224,
                                          "mean": [0.485, 0.456, 0.406],
                                          "std": [0.229, 0.224, 0.225],
                                          "interpolation": "bilinear", "keep_aspect": True}
    assert json.loads(text)["class_names"] == ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    code, text = run("info", str(out))
    assert f"weights file {named.name}  sha256 {file_sha256(path)}" in text
    assert "preprocessing applied: resize shorter side to 256" in text
    assert "weights entry ResNet18_Weights.IMAGENET1K_V1" in text
    code, text = run("verify", str(out), "--data", data_spec(images, "unnamed"),
                     "--teacher", teacher)
    assert code == 0 and "teacher preprocessing" in text and "data: all 4" in text, text


def test_torchvision_safetensors_with_preprocessing_in_the_spec(
        images: Path, resnet18: tuple, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torchvision.transforms import v2

    model, _ = resnet18
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    teacher = (f"torchvision:resnet18?weights={path}&resize=80&crop=64&interpolation=bicubic"
               "&mean=0.5,0.4,0.3&std=0.2,0.25,0.3")
    out = tmp_path / "s.h5"
    code, text = precompute(images, teacher, out)
    assert code == 0, text
    transform = v2.Compose([v2.Resize(80, interpolation=v2.InterpolationMode.BICUBIC),
                            v2.CenterCrop(64), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])
    with torch.no_grad():
        expected = model(torch.stack([transform(x) for x in decoded(images)])).numpy()
    np.testing.assert_allclose(stored_logits(out), expected, rtol=1e-4, atol=1e-4)
    with open_transfer_set(out) as ts:
        assert ts.meta["teacher"]["members"][0]["weights_sha256"][0]["sha256"] == \
            file_sha256(path)
        assert ts.meta["class_names"] == ["even", "odd"]  # the data's own names win
    with open_transfer_set(out) as ts:  # stage two hashes raw images as the teacher saw them
        assert check_alignment(RawImages(str(images)), ts, np.arange(4)) == 4
    # the replay comes from the metadata: the live spec without the overrides still verifies
    # the data, and says that its own preprocessing differs
    code, text = run("verify", str(out), "--data", data_spec(images),
                     "--teacher", teacher.split("&")[0] + "&resize=90&crop=64&mean=0.5&std=0.2")
    assert "ok   data: all 4 sample hashes match" in text, text
    assert "ok   teacher: 4 sampled rows recomputed" in text, text  # replayed as recorded
    assert "FAIL teacher preprocessing: replayed from the metadata: resize shorter side to 80 " \
        "(bicubic)" in text and "the live teacher's own is resize shorter side to 90" in text


@pytest.mark.parametrize("weights, message", [
    ("IMAGENET1K_V1", "download https://download.pytorch.org/models/resnet18-f37072fd.pth once"),
    ("DEFAULT", "download https://download.pytorch.org/models/resnet18-f37072fd.pth once"),
    ("missing.pth", "no weights file"),
])
def test_weights_names_are_refused(images: Path, tmp_path: Path, weights: str,
                                   message: str) -> None:
    code, text = precompute(images, f"torchvision:resnet18?weights={weights}", tmp_path / "s.zarr")
    assert code != 0 and message in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "s.zarr").exists()


def test_mismatched_state_dicts_are_refused(images: Path, resnet18: tuple,
                                            tmp_path: Path) -> None:
    _, path = resnet18
    code, text = precompute(images, f"torchvision:resnet34?weights={path}", tmp_path / "a.zarr")
    assert code != 0 and "missing (layer1.2" in text and "another architecture" in text, text
    code, text = precompute(images, f"torchvision:resnet18?weights={path}&num_classes=10",
                            tmp_path / "b.zarr")
    assert code != 0 and "1000-class head" in text and "num_classes=1000" in text, text
    extra = tmp_path / "extra.pth"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "fc.extra": torch.zeros(2)}, extra)
    code, text = precompute(images, f"torchvision:resnet18?weights={extra}", tmp_path / "c.zarr")
    assert code != 0 and "1 unexpected (fc.extra)" in text, text
    named = tmp_path / "resnet18-f37072fd.pth"  # torchvision's real file name, our bytes
    shutil.copy(path, named)
    code, text = precompute(images, f"torchvision:resnet18?weights={named}", tmp_path / "d.zarr")
    assert code != 0 and "begins with f37072fd" in text, text
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr", "d.zarr"))


def test_a_file_that_does_not_fit_is_refused_before_the_model_is_allocated(
        resnet18: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The architecture is first built on the meta device (shapes only) and checked against
    the file: a small file naming a large model costs no memory for that model."""
    from softlabels.errors import SpecError
    from softlabels.teachers import torchvision as torchvision_teacher
    from softlabels.teachers.models import build_model

    _, path = resnet18
    devices: list[str] = []
    real = torchvision_teacher._get_model

    def spy(*args: object) -> torch.nn.Module:
        devices.append(str(torch.get_default_device()))
        return real(*args)

    monkeypatch.setattr(torchvision_teacher, "_get_model", spy)
    with pytest.raises(SpecError, match="another architecture"):
        build_model(f"torchvision:resnet152?weights={path}")
    assert devices == ["meta"]
    build_model(f"torchvision:resnet18?weights={path}")
    assert devices == ["meta", "meta", "cpu"]


def test_random_teacher_needs_the_flag(npz_data: str, tmp_path: Path) -> None:
    for teacher in ("mlp:16-3", "torchvision:resnet18?num_classes=3"):
        code, text = run("precompute", "--data", npz_data, "--teacher", teacher,
                         "--out", str(tmp_path / "s.zarr"))
        assert code != 0 and "no trained weights" in text and "--random-teacher" in text, text
        assert not (tmp_path / "s.zarr").exists()
    code, text = run("precompute", "--data", npz_data, "--teacher", "mlp:16-3",
                     "--out", str(tmp_path / "s.zarr"), "--random-teacher")
    assert code == 0, text
    with open_transfer_set(tmp_path / "s.zarr") as ts:
        assert ts.meta["teacher"]["members"][0]["untrained"] is True
    assert "untrained: random initialisation" in run("info", str(tmp_path / "s.zarr"))[1]


def test_preprocessing_is_not_applied_to_arrays_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torchvision

    from softlabels.compute.blocks import precompute as run_precompute

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((5, 3, 8, 8), np.float32))
    npz_data = f"npz:{tmp_path / 'd.npz'}"
    torch.manual_seed(0)
    path = tmp_path / "t.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    with caplog.at_level(logging.WARNING):
        result = run_precompute(npz_data, [f"torchvision:resnet18?weights={path}&num_classes=3"
                                           "&resize=8&crop=4&mean=0.5&std=0.5"],
                                tmp_path / "s.zarr", device="cpu")
    assert "preprocessing" in caplog.text and "not applied" in caplog.text
    assert "preprocess" not in result.meta["teacher"]  # nothing was applied


def test_ensemble_members_with_other_preprocessing_are_refused(
        images: Path, resnet18: tuple, tmp_path: Path) -> None:
    _, path = resnet18
    a = f"torchvision:resnet18?weights={path}&resize=40&crop=32&mean=0.5&std=0.5"
    code, text = run("precompute", "--data", data_spec(images), "--teacher", a,
                     "--teacher", a.replace("resize=40", "resize=48"),
                     "--out", str(tmp_path / "s.zarr"))
    assert code != 0 and "different preprocessing" in text, text


def test_a_source_with_its_own_preprocessing_hook_is_used(images: Path) -> None:
    """An image source that can preprocess itself (and keep its own sample hash) is asked to,
    rather than wrapped."""
    from softlabels.compute.teacher_inputs import Preprocessed, teacher_inputs
    from softlabels.preprocessing import Preprocess

    class Hooked(RawImages):
        def with_preprocess(self, preprocess: Preprocess) -> Preprocessed:
            self.asked = preprocess
            return Preprocessed(RawImages(str(images)), preprocess)

    source, pre = Hooked(str(images)), Preprocess(resize=8, crop=8)
    data, applied = teacher_inputs(source, pre)
    assert applied == pre and source.asked == pre and data[0][0].shape == (3, 8, 8)
    plain, applied = teacher_inputs(RawImages(str(images)), pre)
    assert isinstance(plain, Preprocessed) and plain[1][0].dtype == torch.float32


# --- timm ------------------------------------------------------------------------------------


def test_timm_checkpoint_with_timms_own_preprocessing(images: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from torchvision.transforms.v2.functional import to_pil_image

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    path = tmp_path / "t.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "s.zarr"
    code, text = precompute(images, f"timm:test_resnet?checkpoint={path}&num_classes=3", out)
    assert code == 0, text
    config = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**config)  # timm's own (PIL) eval transform
    with torch.no_grad():
        expected = model(torch.stack([transform(to_pil_image(x))
                                      for x in decoded(images)])).numpy()
    np.testing.assert_allclose(stored_logits(out), expected, rtol=1e-4, atol=1e-4)
    with open_transfer_set(out) as ts:
        assert ts.meta["teacher"]["preprocess"]["resize"] == 168  # floor(160 / 0.95)
        assert ts.meta["teacher"]["members"][0]["weights_sha256"][0]["sha256"] == \
            file_sha256(path)
    code, text = precompute(images, "timm:test_resnet?num_classes=4", tmp_path / "r.zarr")
    assert code != 0 and "no trained weights" in text, text
    code, text = precompute(images, f"timm:test_resnet?checkpoint={path}", tmp_path / "m.zarr")
    assert code != 0 and "3-class head" in text, text


# --- Hugging Face image classifiers ----------------------------------------------------------


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label={0: "ant", 1: "bee", 2: "cat"},
        label2id={"ant": 0, "bee": 1, "cat": 2})
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vit") / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(root)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def test_hf_image_classifier_with_its_processor(images: Path, vit: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = tmp_path / "s.zarr"
    code, text = precompute(images, f"hf:{vit}", out, factory="unnamed")
    assert code == 0, text
    model = AutoModelForImageClassification.from_pretrained(vit).eval()
    processor = AutoImageProcessor.from_pretrained(vit)
    with torch.no_grad():
        pixels = processor(images=decoded(images), return_tensors="pt")["pixel_values"]
        expected = model(pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(stored_logits(out), expected, rtol=1e-3, atol=1e-3)
    with open_transfer_set(out) as ts:
        assert ts.meta["class_names"] == ["ant", "bee", "cat"]
        assert ts.meta["teacher"]["preprocess"]["keep_aspect"] is False
        files = ts.meta["teacher"]["members"][0]["weights_sha256"]
        assert files == [{"file": "model.safetensors",
                          "sha256": file_sha256(vit / "model.safetensors")}]


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~10 s
def test_hf_teacher_from_python_m_softlabels(images: Path, vit: Path, tmp_path: Path) -> None:
    """The command as a user types it, in its own process: a set, then its teacher shown."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    out = tmp_path / "s.zarr"
    done = subprocess.run([sys.executable, "-m", "softlabels", "precompute", "--data",
                           data_spec(images), "--teacher", f"hf:{vit}", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"wrote {out}: 4 rows x 3 classes" in done.stdout, done.stderr
    shown = subprocess.run([sys.executable, "-m", "softlabels", "info", str(out)], env=env,
                           capture_output=True, text=True, timeout=300).stdout
    assert "weights file model.safetensors  sha256 " in shown and "square to 32" in shown


def test_hf_missing_tensor_and_other_architecture_are_refused(
        images: Path, vit: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    lacking = tmp_path / "lacking"
    shutil.copytree(vit, lacking)
    tensors = load_file(lacking / "model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, lacking / "model.safetensors", metadata={"format": "pt"})
    code, text = precompute(images, f"hf:{lacking}", tmp_path / "a.zarr")
    assert code != 0 and "1 missing" in text and "at random" in text, text

    other = tmp_path / "other"
    shutil.copytree(vit, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["DeiTForImageClassification"]
    config["model_type"] = "deit"
    (other / "config.json").write_text(json.dumps(config))
    code, text = precompute(images, f"hf:{other}", tmp_path / "b.zarr")
    assert code != 0 and ("missing" in text or "unexpected" in text or "loads as" in text), text
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_hf_causal_lm_missing_tensor_is_refused(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from softlabels.errors import SpecError
    from softlabels.teachers.models import build_model

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=32)
    root = tmp_path / "lm"
    transformers.GPT2LMHeadModel(config).save_pretrained(root)
    build_model(f"hf:{root}")  # whole: loads
    tensors = load_file(root / "model.safetensors")
    del tensors[next(k for k in sorted(tensors) if "mlp" in k)]
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpecError, match="missing"):
        build_model(f"hf:{root}")


# --- specs: checkpoints and other processes --------------------------------------------------


def test_a_checkpoint_records_the_architecture_not_the_weights_file(resnet18: tuple,
                                                                     tmp_path: Path) -> None:
    """A student started from a weights file is saved with the spec of its architecture: its
    own state dict holds the weights, and the file need not exist where it is loaded."""
    from softlabels.teachers.models import load_checkpoint, save_checkpoint

    model, path = resnet18
    spec = f"torchvision:resnet18?weights={path}&num_classes=1000"
    save_checkpoint(model, tmp_path / "c.pt", spec=spec)
    loaded, payload = load_checkpoint(tmp_path / "c.pt")
    assert payload["model_spec"] == "torchvision:resnet18?num_classes=1000"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))


def test_portable_specs_make_weights_paths_absolute(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from softlabels.specs import portable_spec

    monkeypatch.chdir(tmp_path)
    p = portable_spec("torchvision:resnet18?weights=w/r18.pth&num_classes=3", kind="MODEL")
    assert p.spec == f"torchvision:resnet18?weights={tmp_path}/w/r18.pth&num_classes=3"
    assert p.paths == (f"{tmp_path}/w/r18.pth",)
    p = portable_spec("timm:test_resnet?checkpoint=t.safetensors", kind="MODEL")
    assert p.paths == (f"{tmp_path}/t.safetensors",)

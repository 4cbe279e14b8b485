"""The README's "Distil your own model" commands run as written, on tiny files: the bundled
photographs cut to 32 pixels stand in for `photos/`, and a seeded torchvision ResNet-18 state
dict saved as torchvision publishes one stands in for the downloaded weights file (its name is
not torchvision's, since no file made here can carry the published hash)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from softlabels.cli import cli
from softlabels.format.reader import open_transfer_set

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = "resnet18-f37072fd.pth"


def readme_commands(section: str) -> list[list[str]]:
    """The `softlabels ...` commands of the first bash block after `## {section}`."""
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"## {re.escape(section)}\n.*?```bash\n(.*?)```", text, re.S)
    assert block, f"README has no bash block under {section!r}"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in joined.splitlines()
            if line.strip().startswith("softlabels ")]


@pytest.mark.slow
def test_distil_your_own_model_runs_as_written(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    commands = readme_commands("Distil your own model")
    assert [c[0] for c in commands] == ["precompute", "info", "train", "evaluate"]
    for source in (ROOT / "data" / "images").rglob("*.*"):
        target = tmp_path / "photos" / source.parent.name / f"{source.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").resize((32, 32)).save(target, quality=90)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    monkeypatch.chdir(tmp_path)

    outputs = []
    for args in commands:
        args = [a.replace(PUBLISHED, "r18.pth") for a in args]
        if args[0] == "train":
            args += ["--batch-size", "3"]  # six photographs: two steps an epoch
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, f"{args}: {result.output}"
        outputs.append(result.output)

    with open_transfer_set(tmp_path / "photos.zarr") as ts:
        teacher = ts.meta["teacher"]["members"][0]
        assert ts.num_rows == 6 and ts.num_classes == 1000
        assert ts.meta["class_names"] == ["cat", "cup", "rocket"]
    assert teacher["weights_sha256"][0]["sha256"] in outputs[1]  # info shows the file's hash
    assert (tmp_path / "student.pt").is_file()
    assert "agreement" in outputs[3].lower()

"""`--max-teacher-bytes`: a teacher (every member together, a checkpoint's own model spec, an
hf: directory's config) measured on the meta device and refused in one line before it is
allocated when it takes more than the bound (default: the memory available). Issue 23 item 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_npz
from softlabels.cli import cli
from softlabels.errors import OptionError, SpecError
from softlabels.options import PrecomputeOptions, parse_bytes
from softlabels.teachers.ensemble import Teacher
from softlabels.teachers.models import build_model, save_checkpoint, spec_bytes
from softlabels.teachers.size import available_memory

SMALL = "mlp:16-64-3"  # (16*64 + 64 + 64*3 + 3) * 4 = 5132 bytes
HUGE = "mlp:16-1000000-1000000-3"  # 1e12 weights: 4 TB, more than any machine here


def _precompute(tmp_path: Path, *teachers: str, extra: tuple[str, ...] = ()):
    data = make_npz(tmp_path / "d.npz")
    args = ["precompute", "--data", data, "--out", str(tmp_path / "s.zarr"), "--random-teacher",
            *[a for t in teachers for a in ("--teacher", t)], *extra]
    return CliRunner().invoke(cli, args)


def _one_line_refusal(result, *words: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_spec_bytes_counts_parameters_and_buffers() -> None:
    assert spec_bytes(SMALL) == (16 * 64 + 64 + 64 * 3 + 3) * 4
    assert spec_bytes("mlp:16-1000000-1000000-3") > 4e12
    model = build_model("torchvision:resnet18?num_classes=10")
    real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert spec_bytes("torchvision:resnet18?num_classes=10") == real


def test_a_huge_teacher_is_refused_by_default_before_allocating(tmp_path: Path) -> None:
    # before: torch tried to allocate 4 TB ("DefaultCPUAllocator: can't allocate memory")
    line = _one_line_refusal(_precompute(tmp_path, HUGE), "3.6 TiB", "nothing was allocated",
                             "--max-teacher-bytes")
    assert "memory available" in line
    assert not (tmp_path / "s.zarr").exists()


def test_the_bound_refuses_and_admits(tmp_path: Path) -> None:
    _one_line_refusal(_precompute(tmp_path, SMALL, extra=("--max-teacher-bytes", "4K")),
                      "5.0 KiB", "5132 bytes", "4096 bytes")
    ok = _precompute(tmp_path, SMALL, extra=("--max-teacher-bytes", "6K"))
    assert ok.exit_code == 0, ok.output


def test_an_ensemble_is_bounded_as_a_whole(tmp_path: Path) -> None:
    # each member fits 8 KB, the two together do not
    line = _one_line_refusal(_precompute(tmp_path, SMALL, SMALL,
                                         extra=("--max-teacher-bytes", "8K")), "5132 bytes")
    assert "less the ensemble's members before it" in line
    assert _precompute(tmp_path, SMALL, SMALL,
                       extra=("--max-teacher-bytes", "11K")).exit_code == 0


def test_a_checkpoint_is_bounded_by_its_file_and_its_model_spec(tmp_path: Path) -> None:
    ckpt = tmp_path / "t.pt"
    save_checkpoint(build_model(SMALL), ckpt, spec=SMALL)
    size = ckpt.stat().st_size
    _one_line_refusal(_precompute(tmp_path, str(ckpt), extra=(
        "--max-teacher-bytes", str(size - 1))), "its file", str(ckpt))
    # its file fits, the model its spec names does not (a bound between the two)
    payload = torch.load(ckpt, weights_only=True)
    payload["model_spec"] = "mlp:16-64-64-3"  # more weights than the file: refused anyway
    torch.save(payload, ckpt)
    with pytest.raises(SpecError, match="edited or damaged"):
        Teacher([str(ckpt)], device="cpu", max_bytes=10**9)
    # a file of float16 weights (21 KB) fits a 30 KB bound; the float32 model its spec
    # names (41 KB) does not, and is refused before it is built
    wide = "mlp:16-512-3"
    save_checkpoint(build_model(wide).half(), ckpt, spec=wide)
    assert ckpt.stat().st_size < 30_000 < spec_bytes(wide) == 40_972
    with pytest.raises(SpecError, match=rf"checkpoint {ckpt} \({wide}\) takes 40.0 KiB"):
        Teacher([str(ckpt)], device="cpu", max_bytes=30_000)
    assert Teacher([str(ckpt)], device="cpu", max_bytes=50_000).members


def test_an_hf_config_naming_a_huge_model_is_refused_before_allocating(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 48,
        "n_embd": 6400, "n_head": 32, "vocab_size": 50000, "bos_token_id": 0,
        "eos_token_id": 0}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    need = spec_bytes(f"hf:{folder}")
    assert need is not None and need > 9e10  # 95.7 GB, measured from config.json alone
    with pytest.raises(SpecError, match="nothing was allocated"):
        Teacher([f"hf:{folder}"], device="cpu", max_bytes=10**9)


def test_verify_teacher_takes_the_bound(tmp_path: Path) -> None:
    assert _precompute(tmp_path, SMALL).exit_code == 0
    data = f"npz:{tmp_path / 'd.npz'}"
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "s.zarr"), "--data", data,
                                      "--teacher", SMALL, "--max-teacher-bytes", "1000"])
    _one_line_refusal(result, "5132 bytes", "1000 bytes")


def test_sizes_parse_with_units_and_bad_ones_are_one_line() -> None:
    assert parse_bytes("8G", "x") == parse_bytes("8GiB", "x") == parse_bytes("8gb", "x") == 8 << 30
    assert parse_bytes(1234, "x") == 1234 and parse_bytes("1.5M", "x") == 3 << 19
    for bad in ("lots", "-5", "0", "8XB", True, ""):
        with pytest.raises(OptionError, match="--max-teacher-bytes"):
            PrecomputeOptions(max_teacher_bytes=bad)
    assert PrecomputeOptions(max_teacher_bytes="2k").max_teacher_bytes == 2048
    assert available_memory() is None or available_memory() > 0


def test_a_dask_worker_loads_the_teacher_under_the_drivers_bound(tmp_path: Path) -> None:
    """A cluster task builds its own teacher from the specs (compute/cluster_tasks.Work): it is
    bounded by the run's --max-teacher-bytes as the driver's is, not by the worker's memory."""
    from softlabels.compute import cluster_tasks

    data = make_npz(tmp_path / "d.npz")
    work = cluster_tasks.Work(data=data, teachers=(SMALL,),
                              opts=PrecomputeOptions(device="cpu", max_teacher_bytes="4K"))
    with pytest.raises(SpecError, match="nothing was allocated"):
        cluster_tasks._worker_state(work)
    roomy = cluster_tasks.Work(data=data, teachers=(SMALL,),
                               opts=PrecomputeOptions(device="cpu", max_teacher_bytes="6K"))
    _, teacher = cluster_tasks._worker_state(roomy)
    assert len(teacher.members) == 1

"""Attacks on the surfaces added in one session (pretrained teachers, `text:` data, export and
import), each a case that used to end in a traceback, a huge allocation or a silently wrong
result; every one must now end in one line naming what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softlabels.errors import DataError, SpecError
from softlabels.preprocessing import Preprocess

# --- teacher preprocessing overrides ----------------------------------------------------------


@pytest.mark.parametrize("options, match", [
    ({"resize": 32, "crop": 64}, r"crop=64 is larger than resize=32"),
    ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, r"mean=\(0.5, 0.5\) has 2 values; images are RGB"),
    ({"resize": 100_000}, r"resize=100000 must be a whole number of pixels in \[1, 4096\]"),
    ({"mean": (0.5, float("nan"), 0.5), "std": (1.0, 1.0, 1.0)}, r"must be finite numbers"),
    ({"mean": (0.5,), "std": (float("inf"),)}, r"must be finite numbers"),
])
def test_preprocessing_overrides_that_make_no_sense_are_refused(options: dict,
                                                                 match: str) -> None:
    with pytest.raises(SpecError, match=match):
        Preprocess(**options)


def test_a_crop_larger_than_the_image_is_refused_not_padded() -> None:
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert Preprocess(crop=20)(image).shape == (3, 20, 20)
    with pytest.raises(DataError, match=r"20x30 pixels is smaller than crop=24"):
        Preprocess(crop=24)(image)


# --- vLLM prompt log-probs --------------------------------------------------------------------

GOOD = '{"prompt_token_ids": [1, 2], "prompt_logprobs": [null, {"2": -0.1, "3": -3.0}]}\n'


def import_vllm_text(tmp_path: Path, text: str | bytes, **options) -> dict:
    from softlabels.sets.vllm import import_vllm

    path = tmp_path / "v.jsonl"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    kwargs = {"topk": 2, "vocab_size": 40, "teacher_name": "T"} | options
    return import_vllm(path, tmp_path / "out.zarr", **kwargs)


def test_vllm_a_good_line_imports(tmp_path: Path) -> None:
    assert import_vllm_text(tmp_path, GOOD)["num_rows"] == 2


@pytest.mark.parametrize("text, match", [
    (GOOD.replace('"3"', '"1' + "0" * 40 + '"'), r"token id '10+' is not an integer in "),
    (GOOD.replace('"3"', '"\\u0663"'), r"token id '٣' is not an integer"),  # Arabic-Indic 3
    (GOOD.replace('"3"', '"\\u00b2"'), r"token id '²' is not an integer"),
    (GOOD.replace('{"2": -0.1,', '{"2": -0.1, "2": -0.5,'), r"line 1: the key '2' appears twice"),
    (GOOD.replace("[1, 2]", "[1, 2]").encode() + b'{"x": "\xff"}\n', r"line 2 is not UTF-8"),
])
def test_vllm_lines_that_used_to_pass_or_crash(tmp_path: Path, text: str | bytes,
                                               match: str) -> None:
    with pytest.raises(DataError, match=match):
        import_vllm_text(tmp_path, text)
    assert not (tmp_path / "out.zarr").exists()


def test_vllm_huge_declared_sizes_allocate_nothing(tmp_path: Path) -> None:
    from softlabels.errors import OptionError

    with pytest.raises(DataError, match=r"2 entries, expected 100000000"):
        import_vllm_text(tmp_path, GOOD, topk=10**8, vocab_size=2**31)  # was 8 GiB per row
    for vocab in (10**12, -3):
        with pytest.raises(OptionError, match=r"--vocab-size must lie in \[2, 2147483648\]"):
            import_vllm_text(tmp_path, GOOD, vocab_size=vocab)


# --- Parquet import of a damaged export -------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from token_data import TEACHER, write_tokens

    from softlabels.compute.blocks import precompute
    from softlabels.sets.export import export_set

    root = tmp_path_factory.mktemp("export")
    precompute(write_tokens(root / "t.jsonl"), [TEACHER], root / "k.zarr", chunk_rows=16,
               topk=4)
    export_set(root / "k.zarr", root / "x", to="parquet")
    return root / "x"


def damaged_copy(export_dir: Path, tmp_path: Path, column: str, edit) -> Path:
    """A copy of the export with `edit` applied to one column's Python values."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(export_dir, tmp_path / "x")
    (f,) = (tmp_path / "x").glob("*.parquet")
    table = pq.read_table(f)
    values = table.column(column).to_pylist()
    edit(values)
    i = table.schema.get_field_index(column)
    table = table.set_column(i, column, pa.array(values, table.schema.field(column).type))
    f.unlink()
    pq.write_table(table.replace_schema_metadata(pq.read_schema(export_dir / f.name).metadata),
                   f)
    return tmp_path / "x"


def _longest(values: list) -> list:
    return max(values, key=len)  # every position distilled, each label known but the last


def _unmask_first_distilled(values: list) -> None:
    row = _longest(values)
    row[0] = [0] * len(row[0])


def _drop_a_label(values: list) -> None:
    _longest(values)[1] = -100


@pytest.mark.parametrize("column, edit", [("target_mask", _unmask_first_distilled),
                                          ("labels", _drop_a_label)])
def test_an_export_with_an_edited_mask_or_label_is_refused(export_dir: Path, tmp_path: Path,
                                                           column: str, edit) -> None:
    from softlabels.errors import MismatchError
    from softlabels.sets.parquet_import import import_parquet

    with pytest.raises(MismatchError, match=r"row \d+: labels differ from what softlabels_labels "
                                            r"and target_mask imply; the export was edited"):
        import_parquet(damaged_copy(export_dir, tmp_path, column, edit), tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_damaged_export_files_end_in_one_line(export_dir: Path, tmp_path: Path) -> None:
    import shutil

    from softlabels.errors import MismatchError, SoftlabelsError
    from softlabels.sets.parquet_import import import_parquet

    cases = {}
    for name, text in (("garbage", "garbage"), ("list", "[1, 2]")):
        shutil.copytree(export_dir, tmp_path / name)
        (tmp_path / name / "_softlabels.json").write_text(text)
        cases[name] = tmp_path / name
    shutil.copytree(export_dir, tmp_path / "hot")
    info = json.loads((tmp_path / "hot" / "_softlabels.json").read_text())
    (tmp_path / "hot" / "_softlabels.json").write_text(json.dumps(info | {"temperature": 5.0}))
    shutil.copytree(export_dir, tmp_path / "flip")
    (f,) = (tmp_path / "flip").glob("*.parquet")
    f.write_bytes(f.read_bytes()[:-100])  # a copy cut short
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name, where in cases.items():
        with pytest.raises(SoftlabelsError, match="is not a JSON object as an export writes it"):
            import_parquet(where, tmp_path / f"{name}.zarr")
    with pytest.raises(MismatchError, match=r"temperature 5.0 is not one the set stores"):
        import_parquet(tmp_path / "hot", tmp_path / "hot.zarr")
    for where in (tmp_path / "flip", tmp_path / "empty.parquet"):
        with pytest.raises(SoftlabelsError, match="is not a readable Parquet file"):
            import_parquet(where, tmp_path / "o.zarr")
    assert not list(tmp_path.glob("*.zarr"))


def test_an_export_with_an_edited_last_label_is_refused(export_dir: Path,
                                                        tmp_path: Path) -> None:
    """The last position's label is in no Hugging Face column; one flipped bit there used to
    import as a different set (verify flagged it afterwards)."""
    from softlabels.errors import MismatchError
    from softlabels.sets.parquet_import import import_parquet

    def edit(values: list) -> None:
        values[1][-1] = -17

    with pytest.raises(MismatchError, match=r"row 1: softlabels_labels are not the next tokens"):
        import_parquet(damaged_copy(export_dir, tmp_path, "softlabels_labels", edit),
                       tmp_path / "b.zarr")


# --- tokenizers -------------------------------------------------------------------------------


def test_a_tokenizer_asking_for_its_own_code_or_without_vocabulary_is_refused(
        tmp_path: Path) -> None:
    """transformers ignores auto_map without trust_remote_code and, with no vocabulary file,
    builds the model type's tokenizer with an empty vocabulary: every document tokenised to
    nothing ("corpus holds no text")."""
    pytest.importorskip("transformers")
    from token_data import save_tokenizer

    from softlabels.sources.tokenizers import load_tokenizer

    save_tokenizer(tmp_path / "tok")
    load_tokenizer(str(tmp_path / "tok"), "text:x")
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text())
                                 | {"auto_map": {"AutoTokenizer": ["tok_evil.Tok", None]}}))
    (tmp_path / "tok" / "tok_evil.py").write_text("raise SystemExit('ran code from a file')\n")
    with pytest.raises(SpecError, match=r"asks for its own code \(auto_map in tokenizer_config"):
        load_tokenizer(str(tmp_path / "tok"), "text:x")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer_config.json").write_text("{}")
    (tmp_path / "bare" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(SpecError, match=r"'.*bare' \(from 'text:x'\) holds no vocabulary"):
        load_tokenizer(str(tmp_path / "bare"), "text:x")


# --- weights files ----------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):  # unpickling would call print: weights_only refuses it
        return (print, ("ran code from a weights file",))


def test_weights_holding_pickled_objects_get_the_right_advice(tmp_path: Path) -> None:
    """torch's own message ("you have two options ...") was cut at its first line."""
    from softlabels.teachers.weights import read_state_dict

    torch.save({"w": torch.zeros(2), "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(SpecError, match=r"evil.pth .* holds pickled Python objects besides "
                                        r"tensors.*torch.save\(model.state_dict\(\), PATH\)"):
        read_state_dict(tmp_path / "evil.pth", "torchvision:resnet18")
    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SpecError, match=r"garbage.pth .*: not a file torch.save wrote"):
        read_state_dict(tmp_path / "garbage.pth", "torchvision:resnet18")


def test_a_killed_import_does_not_resume_onto_changed_log_probs(tmp_path: Path) -> None:
    """import --vllm SIGKILLed after two blocks, its input's log-probs edited (same tokens, so
    the same sample hashes), rerun: it resumed and mixed blocks of both files (verified)."""
    import subprocess
    import sys

    from softlabels.errors import MismatchError
    from softlabels.format.reader import open_transfer_set
    from softlabels.sets.vllm import import_vllm

    path, out = tmp_path / "v.jsonl", tmp_path / "out.zarr"
    path.write_text(GOOD * 12)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import faultpoints; "
              "faultpoints.arm('softlabels.format.writer:write_block', 2, 'after'); "
              "from softlabels.sets.vllm import import_vllm; "
              "import_vllm(sys.argv[2], sys.argv[3], topk=2, vocab_size=40, teacher_name='T', "
              "chunk_rows=4)")
    killed = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent),
                             str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    path.write_text(GOOD.replace("-3.0", "-2.5") * 12)
    with pytest.raises(MismatchError, match="made from a different run"):
        import_vllm(path, out, topk=2, vocab_size=40, teacher_name="T", chunk_rows=4)
    path.write_text(GOOD * 12)
    import_vllm(path, out, topk=2, vocab_size=40, teacher_name="T", chunk_rows=4)
    with open_transfer_set(out) as ts:
        assert ts.num_rows == 24


def test_export_topk_of_a_sparse_set_is_refused_not_ignored(export_dir: Path,
                                                            tmp_path: Path) -> None:
    from softlabels.errors import OptionError
    from softlabels.sets.export import export_set

    with pytest.raises(OptionError, match=r"--topk 2 applies to a dense set; .*k.zarr is topk"):
        export_set(export_dir.parent / "k.zarr", tmp_path / "x", to="parquet", topk=2)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.exporting").exists()


# --- the Hugging Face Trainer -----------------------------------------------------------------


def test_trainer_refuses_records_taken_at_another_temperature(export_dir: Path,
                                                              tmp_path: Path) -> None:
    """records(set) are the teacher's log-probs at T = 1; a DistillationTrainer at T = 2
    compared them with the student's softmax at T = 2 and trained (a set imported from vLLM,
    exact at T = 1 only, included)."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from softlabels.errors import OptionError
    from softlabels.integrations.hf import (
        DistillationCollator,
        DistillationTrainer,
        records,
        records_temperature,
    )
    from softlabels.sets.export import export_set

    export_set(export_dir.parent / "k.zarr", tmp_path / "hf", to="hf")
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert records_temperature(loaded) == 1.0
    student = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no")
    for dataset in (records(export_dir.parent / "k.zarr"), loaded):
        with pytest.raises(OptionError, match=r"log-probs at T = 1 but the trainer's "
                                              r"temperature is 2"):
            DistillationTrainer(model=student, args=args, train_dataset=dataset,
                                data_collator=DistillationCollator(), temperature=2.0)
    DistillationTrainer(model=student, args=args, train_dataset=loaded,
                        data_collator=DistillationCollator(), temperature=1.0)


def test_a_student_smaller_than_the_vocabulary_is_refused_in_one_line() -> None:
    from softlabels.errors import OptionError
    from softlabels.integrations.hf import distillation_loss

    batch = {"target_token_ids": torch.tensor([[[1, 7]]]), "target_mask": torch.ones(1, 1, 2),
             "target_logprobs": torch.log(torch.tensor([[[0.5, 0.3]]])),
             "labels": torch.tensor([[-100]])}
    distillation_loss(torch.zeros(1, 1, 8), batch)
    with pytest.raises(OptionError, match=r"token id 7 but the student has 5 outputs"):
        distillation_loss(torch.zeros(1, 1, 5), batch)  # was an IndexError inside torch


def test_a_head_of_another_class_count_gets_advice_that_works() -> None:
    """A 10-class file under a spec without num_classes (1000 by default) was told "set
    num_classes=10 (or leave it out)": leaving it out is what failed."""
    from softlabels.teachers.weights import check_tensors

    own = {"fc.weight": torch.zeros(1000, 4), "fc.bias": torch.zeros(1000)}
    state = {"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}
    with pytest.raises(SpecError, match=r"set num_classes=10, or train") as err:
        check_tensors(own, state, "weights file r18.pth", "torchvision:resnet18?weights=r18.pth")
    assert "leave it out" not in str(err.value)


# --- text: corpora ----------------------------------------------------------------------------


def test_a_corpus_file_that_is_a_device_or_pipe_is_refused(tmp_path: Path) -> None:
    """A z.txt linking to /dev/zero was read until memory ran out; a pipe would hang."""
    import os

    from softlabels.sources.text import text_files

    (tmp_path / "a.txt").write_text("the cat")
    assert text_files(tmp_path) == [tmp_path / "a.txt"]
    (tmp_path / "z.txt").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"z.txt is not a regular file"):
        text_files(tmp_path)
    (tmp_path / "z.txt").unlink()
    os.mkfifo(tmp_path / "p.txt")
    with pytest.raises(DataError, match=r"p.txt is not a regular file"):
        text_files(tmp_path)


def test_an_hf_directory_with_a_safetensors_link_to_a_device_is_refused(tmp_path: Path) -> None:
    """Every *.safetensors is hashed for the provenance: a link to /dev/zero hung there."""
    transformers = pytest.importorskip("transformers")
    from softlabels.teachers.models import build_model

    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    (tmp_path / "extra.safetensors").symlink_to(tmp_path / "gone")  # dangling: read first
    with pytest.raises(SpecError, match=r"extra.safetensors .* is not a regular file"):
        build_model(f"hf:{tmp_path}")
    (tmp_path / "extra.safetensors").unlink()
    (tmp_path / "extra.safetensors").symlink_to("/dev/zero")
    with pytest.raises(SpecError, match=r"extra.safetensors .* is not a regular file"):
        build_model(f"hf:{tmp_path}")


def test_a_directory_of_axolotl_parquet_imports_and_bad_options_are_refused(
        export_dir: Path, tmp_path: Path) -> None:
    """A directory of plain Parquet (no sidecar) was refused as "not an export", though
    documented; --temperature 0 or nan and a --vocab-size of 1e12 wrote sets."""
    import pyarrow.parquet as pq

    from softlabels.errors import OptionError
    from softlabels.format.reader import open_transfer_set
    from softlabels.sets.parquet_import import COLUMNS, import_parquet

    (f,) = export_dir.glob("*.parquet")
    (tmp_path / "axo").mkdir()
    pq.write_table(pq.read_table(f, columns=list(COLUMNS)).replace_schema_metadata({}),
                   tmp_path / "axo" / "data-00000.parquet")
    for options, match in (({"temperature": 0.0}, "--temperature must be positive"),
                           ({"temperature": float("nan")}, "--temperature must be positive"),
                           ({"vocab_size": 10**12}, r"--vocab-size must lie in \[2, ")):
        with pytest.raises(OptionError, match=match):
            import_parquet(tmp_path / "axo", tmp_path / "bad.zarr",
                           **({"teacher_name": "T", "vocab_size": 11} | options))
    assert not (tmp_path / "bad.zarr").exists()
    import_parquet(tmp_path / "axo", tmp_path / "ok.zarr", teacher_name="T", vocab_size=11)
    with open_transfer_set(tmp_path / "ok.zarr") as ts:
        assert ts.temperatures == [1.0] or list(ts.temperatures) == [1.0]


def test_a_truncated_safetensors_in_an_hf_dir_is_one_line(tmp_path: Path) -> None:
    """A garbage `model.safetensors` ended in a SafetensorError traceback (issue 23)."""
    transformers = pytest.importorskip("transformers")
    from softlabels.teachers.models import load_model

    config = transformers.GPT2Config(vocab_size=11, n_positions=16, n_embd=8, n_layer=1,
                                     n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt")
    weights = tmp_path / "gpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SpecError, match="cannot load .*save_pretrained"):
        load_model(f"hf:{tmp_path / 'gpt'}")

"""Raw text and conversations as sequence data (`text:`), tokenised with the teacher's own
tokenizer; strict token data; windows; refusals before the first batch (docs/TEXT.md).

Everything is built here: token_data's WordLevel tokenizer (one token per word, so a
conversation's tokens can be counted piece by piece), wrapped with a chat template, saved with
save_pretrained beside a one-layer GPT-2 built from a config."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import MARKED, PLAIN, WORDS, save_tokenizer

from softlabels.cli import cli
from softlabels.errors import DataError, SpecError
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import SEQ_MASK, SEQ_TOKENS, read_offsets
from softlabels.sources.load import load_data
from softlabels.sources.tokens import TokenSequences
from softlabels.sources.windows import window_starts, windowed
from softlabels.specs import portable_spec
from softlabels.train.losses import sequence_kd_loss
from softlabels.train.padded import SequenceBatch

transformers = pytest.importorskip("transformers", reason="text: needs the hf extra")
tokenizers = pytest.importorskip("tokenizers", reason="text: needs the hf extra")

CONTEXT = 32


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer and a one-layer GPT-2 over its vocabulary, in one save_pretrained folder."""
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = save_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=16,
                                     n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def document(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = " ".join(WORDS).split()
    return " ".join(rng.choice(words, n_words)) + "\n\nthe end\n"


def live_logits(teacher_dir: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def precompute_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["precompute", *args])


def test_text_windows_match_an_independent_forward_pass(tmp_path: Path,
                                                        teacher_dir: Path) -> None:
    (tmp_path / "doc.txt").write_text(document(40, seed=1))
    spec = f"text:{tmp_path / 'doc.txt'}?tokenizer={teacher_dir}&max_length=16&stride=4"
    out = tmp_path / "s.zarr"
    result = precompute_cli("--data", spec, "--teacher", f"hf:{teacher_dir}", "--topk", "8",
                            "--out", str(out), "--temperatures", "1,2", "--chunk-rows", "16")
    assert result.exit_code == 0, result.output
    ids = transformers.AutoTokenizer.from_pretrained(teacher_dir)(
        (tmp_path / "doc.txt").read_text())["input_ids"]
    assert ids[0] == 1 and len(ids) > CONTEXT  # <s> first; longer than the teacher's context
    starts = list(range(0, len(ids) - 4, 12))  # windows of 16 sharing 4: a step of 12
    seen = np.zeros(len(ids), int)
    with open_transfer_set(out) as ts:
        offsets = read_offsets(ts)
        assert len(offsets) - 1 == len(starts)
        for w, a in enumerate(starts):
            r0, r1 = offsets[w], offsets[w + 1]
            window = ids[a:a + 16]
            np.testing.assert_array_equal(ts.read(SEQ_TOKENS, r0, r1), window)
            z = live_logits(teacher_dir, window)  # the window alone: what the teacher saw
            classes, weights = ts.sparse_targets(2.0, r0, r1)
            np.testing.assert_array_equal(classes, np.sort(torch.topk(z, 8).indices.numpy()))
            np.testing.assert_allclose(weights, torch.softmax(z / 2, -1).gather(
                1, torch.from_numpy(classes)).numpy(), rtol=2e-3, atol=1e-6)
            mask = ts.read(SEQ_MASK, r0, r1)
            np.testing.assert_array_equal(mask[:4], int(w == 0))  # shared with the one before
            assert mask[4:].all()
            seen[a + np.flatnonzero(mask)] += 1
            # hard targets: the next token of the document, across the window's end
            np.testing.assert_array_equal(ts.labels()[r0:r1],
                                          (ids + [-1])[a + 1:a + 1 + len(window)])
        np.testing.assert_array_equal(seen, 1)  # every position distilled exactly once
        dataset = ts.meta["dataset"]
        assert dataset["windows"] == {"max_length": 16, "stride": 4, "sequences_cut": 1,
                                      "source_sequences": 1}
        listing = "".join(  # sha256sum's lines over the tokenizer files, in sorted order
            f"{hashlib.sha256((teacher_dir / n).read_bytes()).hexdigest()}  {n}\n"
            for n in sorted(["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]))
        assert dataset["tokenizer"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
        assert sorted(dataset["tokenizer"]["files"]) == sorted(
            ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert dataset["tokenizer"]["sha256"][:16] in info.output and "windows of 16" in info.output
    verified = CliRunner().invoke(cli, ["verify", str(out), "--data", spec, "--teacher",
                                        f"hf:{teacher_dir}"])
    assert verified.exit_code == 0, verified.output


def test_a_tokenizer_json_file_is_hashed_by_its_bytes(tmp_path: Path, teacher_dir: Path) -> None:
    (tmp_path / "d.txt").write_text("the cat sat on the mat")
    data = load_data(f"text:{tmp_path / 'd.txt'}?tokenizer={teacher_dir / 'tokenizer.json'}")
    want = hashlib.sha256((teacher_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert data.provenance["tokenizer"]["sha256"] == want
    np.testing.assert_array_equal(data.tokens, transformers.AutoTokenizer.from_pretrained(
        teacher_dir)("the cat sat on the mat")["input_ids"])


def test_a_directory_is_one_document_a_file_in_sorted_order(tmp_path: Path,
                                                            teacher_dir: Path) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    texts = {"b.txt": "a dog ran", "a.txt": "the cat\n\nsat", "sub/c.txt": "hello world",
             "empty.txt": "", "skip.md": "it is late"}
    for name, text in texts.items():
        (tmp_path / "docs" / name).write_text(text)
    data = load_data(f"text:{tmp_path / 'docs'}?tokenizer={teacher_dir}")
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    # the empty file still gets <s>: only a document of no tokens at all would be left out
    order = ["a.txt", "b.txt", "empty.txt", "sub/c.txt"]
    assert [len(data[i]) for i in range(len(data))] == [
        len(tok(texts[n])["input_ids"]) for n in order]
    for i, name in enumerate(order):
        np.testing.assert_array_equal(data[i], tok(texts[name])["input_ids"])
        assert data.describe(i) == f"sequence {i} ({tmp_path / 'docs' / name})"
    assert data.mask is None and data.labels is None  # whole documents: next-token labels


CHATS = [
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "i am fine"},
     {"role": "user", "content": "what is the time"},
     {"role": "assistant", "content": "it is late"}],
    [{"role": "user", "content": "how are you"},
     {"role": "assistant", "content": "fine thank you"}],
    [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "the cat"}],
]


def expected_chat(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Tokens and assistant flags counted piece by piece (one WordLevel token per word)."""
    ids, assistant = [], []
    for m in messages:
        head = "<|assistant|>" if m["role"] == "assistant" else "<|user|>"
        body = tok(f"{m['content']} <|end|>", add_special_tokens=False)["input_ids"]
        ids += tok(head, add_special_tokens=False)["input_ids"] + body
        assistant += [0] + [int(m["role"] == "assistant")] * len(body)
    return ids, assistant


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["generation-markers", "prefixes"])
def test_chat_masks_exactly_the_prompt_tokens(tmp_path: Path, teacher_dir: Path,
                                              template: str) -> None:
    tok = save_tokenizer(tmp_path / "tok", template)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    spec = f"text:{path}?tokenizer={tmp_path / 'tok'}&chat=messages&mask=assistant"
    data = load_data(spec)
    assert data.provenance["chat"]["assistant_tokens"] == (
        "generation" if template == MARKED else "prefix")
    for s, messages in enumerate(CHATS):
        ids, assistant = expected_chat(tok, messages)
        np.testing.assert_array_equal(data[s], ids)
        # row p predicts token p + 1: distilled exactly when that token is the assistant's
        np.testing.assert_array_equal(data.sequence_mask(s), assistant[1:] + [0])
    everything = load_data(spec.replace("mask=assistant", "mask=all"))
    assert everything.mask is None and np.array_equal(everything.tokens, data.tokens)
    out = tmp_path / "chat.zarr"
    result = precompute_cli("--data", spec, "--teacher", f"hf:{teacher_dir}", "--topk", "4",
                            "--out", str(out))
    assert result.exit_code == 0, result.output
    with open_transfer_set(out) as ts:
        np.testing.assert_array_equal(ts.read(SEQ_MASK), data.mask)
        assert ts.meta["dataset"]["chat"]["mask"] == "assistant"


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    # the last user turn is rendered differently from the others: prefixes are not prefixes
    rewrite = PLAIN.replace("<|user|> {{ m['content'] }}",
                            "<|user|> {% if loop.last %}hello {% endif %}{{ m['content'] }}")
    save_tokenizer(tmp_path / "tok", rewrite)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    with pytest.raises(DataError, match=r"sequence 0 \(.*c.jsonl line 1\).*generation"):
        load_data(f"text:{tmp_path / 'c.jsonl'}?tokenizer={tmp_path / 'tok'}&chat=messages"
                  "&mask=assistant")


def write_rows(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"tokens:{path}"


GOOD = [{"tokens": [1, 2, 3], "m": [0, 1, 1]}, {"tokens": [4, 5], "m": [1, 1]}]


@pytest.mark.parametrize("rows, options, match", [
    ([[1, 2], [1.5, 2.7]], "", r"sequence 1 \(.*line 2\): expected integer token ids.*1\.5"),
    ([[1.0, 2]], "", r"sequence 0 .*found 1\.0 \(float\)"),
    ([[1, 2], [True, 2]], "", r"sequence 1 .*found True \(bool\)"),
    ([["1", 2]], "", r"found '1' \(str\)"),
    ([{"tokens": [1, 2], "m": [0.5, 1]}], "?mask=m", r"mask values 0 or 1.*0\.5"),
    ([{"tokens": [1, 2], "m": [2, 1]}], "?mask=m", r"mask value 2 at position 0 is outside"),
    ([{"tokens": [1, 2], "m": [1]}], "?mask=m", r"has 1 values for 2 tokens"),
    ([[1, 2], [3, -1]], "", r"sequence 1 .*token id -1 at position 1 is outside"),
    ([{"tokens": [1, 2], "y": [1, 2.0]}], "?labels=y", r"integer labels"),
    ([[1, 2, 3]], "?stride=2", r"stride=2 without max_length"),
    ([[1, 2, 3]], "?max_length=4&stride=4", r"stride must be an integer in \[0, max_length\)"),
])
def test_strict_token_data(tmp_path: Path, rows: list[Any], options: str, match: str) -> None:
    spec = write_rows(tmp_path / "t.jsonl", rows) + options
    with pytest.raises((DataError, SpecError), match=match):
        load_data(spec)


def test_boolean_masks_are_accepted_as_0_and_1(tmp_path: Path) -> None:
    spec = write_rows(tmp_path / "t.jsonl", [{"tokens": [1, 2, 3], "m": [False, True, True]}])
    np.testing.assert_array_equal(load_data(spec + "?mask=m").mask, [0, 1, 1])


def test_float_ids_in_parquet_are_refused(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"tokens": [[1.0, 2.0], [3.5]]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"sequence 0 \(.*t.parquet row 0\).*1\.0 \(float\)"):
        load_data(f"tokens:{tmp_path / 't.parquet'}")


@pytest.mark.parametrize("n, length, stride", [(1, 4, 0), (4, 4, 1), (5, 4, 0), (9, 4, 3),
                                               (23, 8, 5), (24, 8, 0), (7, 2, 1)])
def test_windows_cover_every_position_once(n: int, length: int, stride: int) -> None:
    tokens = list(range(100, 100 + n))
    mask = [int(i % 3 != 0) for i in range(n)]  # the data's own mask survives the cut
    data = windowed(TokenSequences([tokens, [7, 8]], masks=[mask, [1, 1]]), length, stride)
    starts = window_starts(n, length, stride)
    seen = np.zeros(n, int)
    for w, a in enumerate(starts):
        window = data[w].numpy()
        assert 1 <= len(window) <= length
        np.testing.assert_array_equal(window, tokens[a:a + len(window)])
        np.testing.assert_array_equal(data.sequence_labels(w, 1000),
                                      (tokens + [-1])[a + 1:a + 1 + len(window)])
        seen[a + np.flatnonzero(data.sequence_mask(w))] += 1
    assert a + len(window) == n  # the last window reaches the end
    np.testing.assert_array_equal(seen, mask)  # each kept position exactly once
    np.testing.assert_array_equal(data[len(starts)], [7, 8])


def test_windowed_tokens_spec_names_the_window(tmp_path: Path) -> None:
    spec = write_rows(tmp_path / "t.jsonl", [[1, 2, 3, 4, 5, 6, 7], [8, 9]])
    data = load_data(spec + "?max_length=4&stride=1")
    assert len(data) == 3
    assert data.describe(1) == f"sequence 1 ({tmp_path / 't.jsonl'} line 1, tokens 3-7)"


def refused(tmp_path: Path, teacher_dir: Path, data: str, match: str) -> None:
    out = tmp_path / "refused.zarr"
    result = precompute_cli("--data", data, "--teacher", f"hf:{teacher_dir}", "--topk", "4",
                            "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert match in result.output, result.output
    assert not out.exists()  # refused before anything was written: no `writing` set


def test_ids_past_the_teachers_vocabulary_are_refused(tmp_path: Path, teacher_dir: Path) -> None:
    vocab = len(transformers.AutoTokenizer.from_pretrained(teacher_dir))
    spec = write_rows(tmp_path / "t.jsonl", [[1, 2], [3, vocab, 4]])
    refused(tmp_path, teacher_dir, spec,
            f"sequence 1 ({tmp_path / 't.jsonl'} line 2): token id {vocab} at position 1 is "
            f"not in the teacher's vocabulary of {vocab} ids")


def test_sequences_past_the_context_are_refused_with_the_windows_advice(
        tmp_path: Path, teacher_dir: Path) -> None:
    (tmp_path / "long.txt").write_text(document(40, seed=2))
    spec = f"text:{tmp_path / 'long.txt'}?tokenizer={teacher_dir}"
    refused(tmp_path, teacher_dir, spec, f"more than the teacher's context of {CONTEXT}")
    refused(tmp_path, teacher_dir, spec, f"add max_length={CONTEXT}&stride=")
    refused(tmp_path, teacher_dir, spec + "&max_length=40&stride=4", "context of 32")


def test_nothing_to_distil_is_refused(tmp_path: Path, teacher_dir: Path) -> None:
    spec = write_rows(tmp_path / "t.jsonl", [{"tokens": [1, 2], "m": [0, 0]},
                                             {"tokens": [3], "m": [0]}]) + "?mask=m"
    refused(tmp_path, teacher_dir, spec, "nothing to distil")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [CHATS[0][0]]}) + "\n")
    refused(tmp_path, teacher_dir, f"text:{tmp_path / 'c.jsonl'}?tokenizer={teacher_dir}"
            "&chat=messages&mask=assistant", "nothing to distil")
    result = CliRunner().invoke(cli, ["train", "--data", spec, "--model",
                                      "gpt:11?dim=8&layers=1&heads=2&context=8", "--out",
                                      str(tmp_path / "s.pt"), "--epochs", "1"])
    assert result.exit_code == 1 and "nothing to distil" in result.output, result.output
    assert "lower --lr" not in result.output


def test_a_batch_of_masked_out_sequences_has_zero_loss() -> None:
    z = torch.randn(2, 3, 5, requires_grad=True)
    batch = SequenceBatch(tokens=torch.zeros(2, 3, dtype=torch.long),
                          labels=torch.ones(2, 3, dtype=torch.long),
                          mask=torch.zeros(2, 3, dtype=torch.bool), kind="topk",
                          sequences=torch.arange(2), classes=torch.zeros(2, 3, 2, dtype=torch.long),
                          weights=torch.full((2, 3, 2), 0.5))
    loss = sequence_kd_loss(z, batch, temperature=2.0)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(z.grad).all()


def test_a_student_with_a_larger_vocabulary_trains_on_hard_tokens(tmp_path: Path) -> None:
    spec = write_rows(tmp_path / "t.jsonl", [[1, 2, 3, 4], [5, 6, 10], [2, 3]])
    base = ["train", "--data", spec, "--out", str(tmp_path / "s.pt"), "--epochs", "1"]
    bigger = CliRunner().invoke(cli, [*base, "--model", "gpt:64?dim=8&layers=1&heads=2"])
    assert bigger.exit_code == 0, bigger.output  # 64 outputs for ids up to 10: a vocabulary
    smaller = CliRunner().invoke(cli, [*base, "--model", "python:helpers:lm_with_head"])
    assert smaller.exit_code == 1 and "at least 11 outputs" in smaller.output, smaller.output


def test_text_specs_travel_to_other_processes_with_absolute_paths(tmp_path: Path,
                                                                  monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    p = portable_spec("text:docs?tokenizer=tok&max_length=16&stride=4", kind="DATA")
    assert p.spec == f"text:{tmp_path / 'docs'}?max_length=16&stride=4&tokenizer={tmp_path / 'tok'}"
    assert p.paths == (str(tmp_path / "docs"), str(tmp_path / "tok"))


@pytest.mark.parametrize("options, match", [
    ("", "names no tokenizer"),
    ("?tokenizer=NOWHERE", "no tokenizer at"),
    ("?tokenizer=TOK&chat=messages", "a .jsonl file, not d.txt"),
    ("?tokenizer=TOK&mask=assistant", "mask= applies to chat files"),
    ("?tokenizer=TOK&colour=red", "unknown text options ['colour']"),
])
def test_bad_text_specs(tmp_path: Path, teacher_dir: Path, options: str, match: str) -> None:
    (tmp_path / "d.txt").write_text("the cat")
    options = options.replace("TOK", str(teacher_dir)).replace("NOWHERE", str(tmp_path / "x"))
    with pytest.raises(SpecError, match=match.replace("[", r"\[").replace("]", r"\]")):
        load_data(f"text:{tmp_path / 'd.txt'}{options}")


def test_a_bare_tokenizer_json_has_no_chat_template(tmp_path: Path, teacher_dir: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHATS[1]}) + "\n")
    with pytest.raises(SpecError, match="has no chat template"):
        load_data(f"text:{tmp_path / 'c.jsonl'}?tokenizer={teacher_dir / 'tokenizer.json'}"
                  "&chat=messages&mask=assistant")


def test_text_that_is_not_utf8_is_refused(tmp_path: Path, teacher_dir: Path) -> None:
    (tmp_path / "d.txt").write_bytes(b"the cat \xff sat")
    with pytest.raises(DataError, match=r"d.txt is not UTF-8 text \(byte 8\)"):
        load_data(f"text:{tmp_path / 'd.txt'}?tokenizer={teacher_dir}")


@pytest.mark.slow
def test_your_own_causal_lm_over_your_own_text(tmp_path: Path, teacher_dir: Path) -> None:
    """The proposed README commands on tiny files (smaller windows): teacher/ and student/ are
    save_pretrained folders, corpus/ a folder of .txt files."""
    import shutil

    shutil.copytree(teacher_dir, tmp_path / "teacher")
    torch.manual_seed(1)
    vocab = len(transformers.AutoTokenizer.from_pretrained(teacher_dir))
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=CONTEXT, n_embd=8, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "student")
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"{i}.txt").write_text(document(30, seed=10 + i))
    (tmp_path / "held_out.txt").write_text(document(20, seed=99))
    data = "text:corpus?tokenizer=teacher&max_length=32&stride=8"
    commands = [
        ["precompute", "--data", data, "--teacher", "hf:teacher", "--out", "lm.zarr",
         "--topk", "8", "--temperatures", "1,2", "--random-teacher"],
        ["train", "--data", data, "--transfer-set", "lm.zarr", "--model", "hf:student",
         "--out", "student.pt", "--temperature", "2", "--epochs", "2"],
        ["evaluate", "--data", "text:held_out.txt?tokenizer=teacher&max_length=32",
         "--model", "student.pt", "--json"],
    ]
    for args in commands:
        run = subprocess.run([sys.executable, "-m", "softlabels", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["positions"] > 0 and np.isfinite(report["perplexity"])


def test_gpt_and_declared_limits_are_checked(tmp_path: Path) -> None:
    from helpers import TinyLM
    from softlabels.compute.token_checks import check_fits_teacher
    from softlabels.teachers.ensemble import Teacher

    data = load_data(write_rows(tmp_path / "t.jsonl", [[1, 2, 3], [4, 5, 6, 7, 8, 9]]))
    with pytest.raises(DataError, match=r"sequence 1 .* has 6 tokens, more than the teacher's "
                                        r"context of 5 \(gpt:11"):
        check_fits_teacher(data, Teacher(["gpt:11?dim=8&layers=1&heads=2&context=5"]))
    with pytest.raises(DataError, match=r"token id 9 at position 5 is not in the teacher's "
                                        r"vocabulary of 9 ids"):
        check_fits_teacher(data, Teacher(["gpt:9?dim=8&layers=1&heads=2&context=8"]))
    declared = TinyLM(11)
    check_fits_teacher(data, Teacher([declared]))  # declares nothing: not checked
    declared.context = 4
    with pytest.raises(DataError, match="context of 4"):
        check_fits_teacher(data, Teacher([declared]))


def test_json_lines_of_text_are_one_document_a_line(tmp_path: Path, teacher_dir: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "the cat sat"}) + "\n\n" + json.dumps({"text": "a dog"})
                    + "\n" + json.dumps({"text": 3}) + "\n")
    spec = f"text:{path}?tokenizer={teacher_dir}&field=text"
    with pytest.raises(DataError, match=r"sequence 2 \(.*d.jsonl line 4\): field 'text' is int"):
        load_data(spec)
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    data = load_data(spec)
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    assert [data[i].tolist() for i in range(2)] == [tok("the cat sat")["input_ids"],
                                                    tok("a dog")["input_ids"]]


@pytest.mark.parametrize("line, options, match", [
    ({"messages": [{"role": "user", "content": ["x"]}]}, "&mask=assistant",
     r"sequence 0 \(.*c.jsonl line 1\): expected a non-empty list of messages"),
    ({"messages": []}, "", "expected a non-empty list of messages"),
    ({"chat": []}, "", "has no field 'messages'"),
    ({"messages": CHATS[1]}, "&mask=prompt", "mask='prompt'"),
])
def test_bad_conversations(tmp_path: Path, teacher_dir: Path, line: Any, options: str,
                           match: str) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises((DataError, SpecError), match=match):
        load_data(f"text:{tmp_path / 'c.jsonl'}?tokenizer={teacher_dir}&chat=messages{options}")

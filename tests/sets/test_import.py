"""`softlabels import`: vLLM prompt log-probs (built from a tiny Hugging Face model's true
log-probs) and Parquet in the export's columns, into verified sequence sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import TEACHER, write_tokens

from helpers import TinyLM
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import DataError, MismatchError, OptionError, SoftlabelsError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set
from softlabels.sets.export import export_set
from softlabels.sets.parquet_import import import_parquet
from softlabels.sets.verify import verify
from softlabels.sets.vllm import import_vllm
from softlabels.train.losses import sequence_kd_loss
from softlabels.train.padded import SequenceBatches

transformers = pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

V, K = 40, 5


def true_logprobs(n: int = 9, seed: int = 0) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prompts and a tiny GPT-2's (built from a config, random weights) log-probs over them:
    lp[s][j] is the distribution of token j + 1 given tokens 0..j."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    rng = np.random.default_rng(seed)
    prompts, lps = [], []
    for _ in range(n):
        ids = rng.integers(0, V, int(rng.integers(1, 14))).tolist()
        with torch.no_grad():
            lps.append(torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                       .float())
        prompts.append(ids)
    return prompts, lps


def vllm_lines(prompts: list[list[int]], lps: list[torch.Tensor], *, ranks: bool = True,
               ) -> list[dict]:
    """What vLLM returns for prompt_logprobs=K, as the OpenAI-compatible server writes it:
    position j >= 1 maps the top K token ids (as strings) to {logprob, rank, decoded_token},
    plus the prompt token when it is not among them; position 0 is null."""
    lines = []
    for ids, lp in zip(prompts, lps):
        out: list = [None]
        for j in range(1, len(ids)):
            row = lp[j - 1]
            rank = (row[None, :] > row[:, None]).sum(1) + 1  # 1 = most likely
            keep = [int(i) for i in torch.topk(row, K).indices]
            if ids[j] not in keep:
                keep.append(ids[j])
            out.append({str(i): ({"logprob": float(row[i]), "rank": int(rank[i]),
                                  "decoded_token": f"<{i}>"} if ranks else float(row[i]))
                        for i in keep})
        lines.append({"prompt_token_ids": ids, "prompt_logprobs": out})
    return lines


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list]:
    d = tmp_path_factory.mktemp("vllm")
    prompts, lps = true_logprobs()
    return write_jsonl(d / "v.jsonl", vllm_lines(prompts, lps)), prompts, lps


@pytest.mark.parametrize("ranks", [True, False])
def test_vllm_import_round_trips_the_exact_t1_distribution(vllm: tuple, tmp_path: Path,
                                                           ranks: bool) -> None:
    path, prompts, lps = vllm
    if not ranks:
        path = write_jsonl(tmp_path / "plain.jsonl", vllm_lines(prompts, lps, ranks=False))
    out = tmp_path / "v.zarr"
    import_vllm(path, out, topk=K, vocab_size=V, teacher_name="tiny-gpt2")
    report = verify(out, data=f"tokens:{path}?field=prompt_token_ids")
    assert report.ok, report
    with open_transfer_set(out) as ts:
        assert ts.temperatures == [1.0] and ts.target.to_meta() == {"kind": "topk", "k": K}
        assert ts.meta["teacher"]["targets"] == {"source": "logprobs",
                                                 "exact_temperatures": [1.0]}
        classes, weights = ts.sparse_targets(1.0)
        mask, row = ts.read("seq/mask"), 0
        for ids, lp in zip(prompts, lps):
            for p in range(len(ids) - 1):
                top = torch.topk(lp[p], K)
                order = np.argsort(top.indices.numpy())
                np.testing.assert_array_equal(classes[row + p], top.indices.numpy()[order])
                np.testing.assert_allclose(weights[row + p], top.values.exp().numpy()[order],
                                           rtol=1e-6)  # exact up to float32
                assert mask[row + p] == 1
            assert mask[row + len(ids) - 1] == 0  # no log-probs after the last token
            row += len(ids)


def test_other_temperatures_refused_in_one_line(vllm: tuple, tmp_path: Path) -> None:
    out = tmp_path / "v.zarr"
    import_vllm(vllm[0], out, topk=K, vocab_size=V, teacher_name="tiny-gpt2")
    with pytest.raises(SoftlabelsError, match=r"stored temperatures \[1.0\] only, not 2.0"):
        SequenceBatches(out, temperature=2.0)
    with pytest.raises(OptionError, match="imported from log-probabilities at T = 1"):
        export_set(out, tmp_path / "x", temperature=2.0)
    result = CliRunner().invoke(cli, ["export", str(out), "--to", "parquet",
                                      str(tmp_path / "x"), "--temperature", "2"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_imported_set_trains_a_student(vllm: tuple, tmp_path: Path) -> None:
    out = tmp_path / "v.zarr"
    import_vllm(vllm[0], out, topk=K, vocab_size=V, teacher_name="tiny-gpt2")
    student = TinyLM(V)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    batches = SequenceBatches(out, temperature=1.0, batch_size=4, seed=0)
    losses = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        for batch in batches:
            loss = sequence_kd_loss(student(batch.tokens), batch, temperature=1.0, alpha=0.9)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])


def _line(prompts: list, lps: list) -> dict:
    return vllm_lines(prompts[:1], lps[:1])[0]


@pytest.mark.parametrize("edit, match", [
    (lambda x: [x["prompt_logprobs"][1].pop(k) for k in list(x["prompt_logprobs"][1])[:2]
                if k != str(x["prompt_token_ids"][1])], "entries, expected 5"),
    (lambda x: x["prompt_logprobs"].__setitem__(0, {}), "the first null"),
    (lambda x: x["prompt_logprobs"].pop(), "one entry per prompt token"),
    (lambda x: x["prompt_logprobs"][2].update({"99": {"logprob": -9.0, "rank": 99}}),
     "entries, expected"),
    (lambda x: x["prompt_token_ids"].__setitem__(1, (x["prompt_token_ids"][1] + 1) % V),
     "prompt token .* is missing"),
    (lambda x: next(iter(x["prompt_logprobs"][1].values())).update(logprob=0.5),
     "finite and <= 0"),
    (lambda x: next(iter(x["prompt_logprobs"][1].values())).update(rank=7), "ranks"),
    (lambda x: [v.update(logprob=-0.01) for v in x["prompt_logprobs"][1].values()],
     "sum to .* > 1"),
])
def test_bad_vllm_lines_refused_naming_the_line(vllm: tuple, tmp_path: Path, edit,
                                                match: str) -> None:
    prompts, lps = vllm[1], vllm[2]
    i = next(i for i, p in enumerate(prompts) if len(p) >= 4)
    good = vllm_lines(prompts[i:i + 1], lps[i:i + 1])[0]
    bad = json.loads(json.dumps(good))
    edit(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=f"line 2.*{match}|{match}") as info:
        import_vllm(path, tmp_path / "o.zarr", topk=K, vocab_size=V, teacher_name="t")
    assert "line 2" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.zarr").exists()  # checked before anything is written


def test_vocabulary_is_checked(vllm: tuple, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"outside the vocabulary \[0, 20\)"):
        import_vllm(vllm[0], tmp_path / "o.zarr", topk=K, vocab_size=20, teacher_name="t")


@pytest.mark.parametrize("to", ["parquet", pytest.param("hf", marks=pytest.mark.slow)])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_export_then_import_is_bit_for_bit(tmp_path: Path, to: str, t: float) -> None:
    spec = write_tokens(tmp_path / "t.jsonl", masks=True) + "?field=input_ids&mask=loss_mask"
    precompute(spec, [TEACHER], tmp_path / "k.zarr", chunk_rows=16, topk=4, dtype="float16",
               temperatures=[1, 2])
    export_set(tmp_path / "k.zarr", tmp_path / "x", to=to, temperature=t, shard_positions=60)
    import_parquet(tmp_path / "x", tmp_path / "back.zarr")
    with open_transfer_set(tmp_path / "k.zarr") as a, \
            open_transfer_set(tmp_path / "back.zarr") as b:
        assert a.meta["digest"] == b.meta["digest"]
        for key in ("teacher", "dataset", "sequence", "temperatures", "chunk_rows"):
            assert a.meta[key] == b.meta[key]
        for name in [*a.row_arrays(), S.SEQ_OFFSETS]:
            x, y = a.store.read(name), b.store.read(name)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
        assert b.meta["provenance"]["imported_from"]["format"] == "softlabels-export"
    assert verify(tmp_path / "back.zarr", data=spec).ok


def test_an_edited_export_is_refused_before_writing(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = write_tokens(tmp_path / "t.jsonl")
    precompute(spec, [TEACHER], tmp_path / "k.zarr", chunk_rows=16, topk=4)
    export_set(tmp_path / "k.zarr", tmp_path / "x", to="parquet")
    (f,) = (tmp_path / "x").glob("*.parquet")
    table = pq.read_table(f)
    meta = table.schema.metadata
    ids = table.column("input_ids").to_pylist()
    ids[3][0] = (ids[3][0] + 1) % 11  # another token: its sample hash no longer matches
    table = table.set_column(0, "input_ids", pa.array(ids, pa.list_(pa.int32())))
    f.unlink()
    pq.write_table(table.replace_schema_metadata(meta), f)
    with pytest.raises(MismatchError, match="row 3: softlabels_sample_hash"):
        import_parquet(tmp_path / "x", tmp_path / "back.zarr")
    assert not (tmp_path / "back.zarr").exists()


def test_axolotl_shaped_parquet_is_imported_at_its_temperature(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts, lps = true_logprobs(n=5, seed=1)
    rows = []
    for ids, lp in zip(prompts, lps):  # Axolotl's layout: target at p = token after p
        top = torch.topk(lp, K)
        mask = [[1] * K] * (len(ids) - 1) + [[0] * K]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:],
                     "target_token_ids": top.indices.tolist(),
                     "target_logprobs": top.values.tolist(), "target_mask": mask})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with pytest.raises(OptionError, match="--teacher-name and --vocab-size"):
        import_parquet(tmp_path / "a.parquet", tmp_path / "o.zarr")
    result = CliRunner().invoke(cli, ["import", "--parquet", str(tmp_path / "a.parquet"),
                                      "--teacher-name", "gpt2-tiny", "--vocab-size", str(V),
                                      "--out", str(tmp_path / "o.zarr")])
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "o.zarr", data=f"tokens:{tmp_path / 'a.parquet'}").ok
    with open_transfer_set(tmp_path / "o.zarr") as ts:
        classes, weights = ts.sparse_targets(1.0)
        labels, mask = ts.labels(), ts.read("seq/mask")
    top = torch.topk(lps[0], K)
    order = np.argsort(top.indices[0].numpy())
    np.testing.assert_allclose(weights[0], top.values[0].exp().numpy()[order], rtol=1e-6)
    n = len(prompts[0])
    np.testing.assert_array_equal(labels[:n], prompts[0][1:] + [-1])
    np.testing.assert_array_equal(mask[:n], [1] * (n - 1) + [0])


def test_cli_vllm_import_needs_its_options(vllm: tuple, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["import", "--vllm", str(vllm[0]), "--out",
                                      str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "--topk" in result.output
    result = CliRunner().invoke(cli, ["import", "--vllm", str(vllm[0]), "--topk", str(K),
                                      "--vocab-size", str(V), "--teacher-name", "t", "--out",
                                      str(tmp_path / "o.zarr")])
    assert result.exit_code == 0, result.output
    assert "9 sequences" in result.output


def test_prompt_token_tied_with_the_kth_is_the_extra_entry(tmp_path: Path) -> None:
    """vLLM counts ranks as 1 + (how many are more likely): a prompt token tied with the Kth
    (but not chosen by top-k) shares rank K; with K + 1 entries it is still the extra one."""
    lp = {"3": {"logprob": -0.5, "rank": 1}, "7": {"logprob": -1.5, "rank": 2},
          "9": {"logprob": -2.5, "rank": 3}, "4": {"logprob": -2.5, "rank": 3}}
    line = {"prompt_token_ids": [1, 4], "prompt_logprobs": [None, lp]}
    path = write_jsonl(tmp_path / "tie.jsonl", [line])
    import_vllm(path, tmp_path / "t.zarr", topk=3, vocab_size=10, teacher_name="t")
    with open_transfer_set(tmp_path / "t.zarr") as ts:
        classes, weights = ts.sparse_targets(1.0)
    np.testing.assert_array_equal(classes[0], [3, 7, 9])
    np.testing.assert_allclose(weights[0], np.exp([-0.5, -1.5, -2.5]), rtol=1e-6)

"""`softlabels export`: sequence sets to Axolotl's KD columns (Parquet shards, a `datasets`
directory), and the loss those columns give against softlabels' own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from token_data import TEACHER, VOCAB, write_tokens

from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.errors import OptionError, SoftlabelsError
from softlabels.format.reader import open_transfer_set
from softlabels.format.sequence import SEQ_MASK, read_offsets
from softlabels.sets.export import export_set, read_export_info
from softlabels.train.losses import sequence_kd_loss
from softlabels.train.padded import SequenceBatches

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

# Axolotl itself is not installed: `pip install axolotl` (0.19) would replace this environment's
# torch 2.14 with 2.13, transformers 5.25 with 5.16 and datasets 5.2 with 4.8. Its formula is
# written out below instead (axolotl/integrations/kd/topk_logprob/forward_kl.py, read).


def axolotl_topk_forward_kl_sum(student_logits: torch.Tensor, target_token_ids: torch.Tensor,
                                target_logprobs: torch.Tensor, target_mask: torch.Tensor,
                                kd_temperature: float) -> torch.Tensor:
    """Axolotl's top-k forward KL, summed over the valid entries (Axolotl then divides by the
    number of label tokens, or of valid entries): sum p_t (log p_t - log q_s), with
    log q_s = log_softmax(s / T) gathered at the teacher's ids; no T^2, no residual."""
    s = torch.log_softmax(student_logits.float() / kd_temperature, -1)
    s = torch.gather(s, -1, target_token_ids)
    valid = target_mask.bool()
    t = target_logprobs.float()[valid]
    return (t.exp() * (t - s[valid])).sum()


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sets")
    spec = write_tokens(d / "t.jsonl", masks=True) + "?field=input_ids&mask=loss_mask"
    out = {}
    for name, kw in (("topk", {"topk": 4, "dtype": "float16", "temperatures": [1, 2]}),
                     ("dense", {"temperatures": [1], "dtype": "float32"}),
                     ("sample", {"sample_k": 5, "temperatures": [1]})):
        out[name] = d / f"{name}.zarr"
        precompute(spec, [TEACHER], out[name], chunk_rows=16, **kw)
    out["tokens"] = d / "t.jsonl"
    return out


def _padded(rows: list[dict], order: np.ndarray, width: int) -> dict[str, torch.Tensor]:
    """The export's records of sequences `order`, right-padded to `width` (written here, not
    with softlabels' collator)."""
    k = len(rows[0]["target_token_ids"][0])
    out = {"ids": torch.zeros(len(order), width, k, dtype=torch.long),
           "lp": torch.zeros(len(order), width, k), "mask": torch.zeros(len(order), width, k)}
    for i, s in enumerate(order):
        n = len(rows[s]["input_ids"])
        out["ids"][i, :n] = torch.tensor(rows[s]["target_token_ids"])
        out["lp"][i, :n] = torch.tensor(rows[s]["target_logprobs"])
        out["mask"][i, :n] = torch.tensor(rows[s]["target_mask"], dtype=torch.float32)
    return out


@pytest.mark.parametrize("to", ["parquet", "hf"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_axolotl_formula_on_the_export_equals_softlabels_loss(sets: dict[str, Path],
                                                              tmp_path: Path, to: str,
                                                              t: float) -> None:
    export_set(sets["topk"], tmp_path / "x", to=to, temperature=t)
    if to == "hf":
        ds = datasets.load_from_disk(str(tmp_path / "x"))
    else:
        ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "x" / "*.parquet"),
                                   split="train", cache_dir=str(tmp_path / "cache"))
    rows = ds.to_list()
    batches = SequenceBatches(sets["topk"], temperature=t, batch_size=len(rows), shuffle=False)
    (batch,) = list(batches)
    order = batch.sequences.numpy()
    logits = torch.randn(*batch.tokens.shape, VOCAB, generator=torch.Generator().manual_seed(0))
    cols = _padded(rows, order, batch.tokens.shape[1])
    for i, s in enumerate(order):  # the same inputs, in the same places
        assert rows[s]["input_ids"] == batch.tokens[i, :len(rows[s]["input_ids"])].tolist()
    ours = sequence_kd_loss(logits, batch, temperature=t, alpha=1.0)
    kl = axolotl_topk_forward_kl_sum(logits, cols["ids"], cols["lp"], cols["mask"], t)
    # softlabels adds the residual mass as one more bucket, and the factor T^2
    valid = cols["mask"].bool().any(-1)
    p = cols["lp"].exp()[valid]
    q = torch.softmax(logits / t, -1).gather(-1, cols["ids"])[valid]
    r = 1 - p.sum(-1)
    rest = torch.xlogy(r, r) - r * (1 - q.sum(-1)).log()
    positions = int(valid.sum())
    assert positions == int(batch.mask.sum())  # target_mask = the set's distilled positions
    torch.testing.assert_close(ours, t**2 * (kl + rest.sum()) / positions, rtol=2e-5, atol=1e-6)


def test_metadata_kept_where_datasets_and_pyarrow_read_it(sets: dict[str, Path],
                                                          tmp_path: Path) -> None:
    export_set(sets["topk"], tmp_path / "p", to="parquet", temperature=2.0, shard_positions=50)
    export_set(sets["topk"], tmp_path / "h", to="hf", temperature=2.0)
    with open_transfer_set(sets["topk"]) as ts:
        digest = ts.meta["digest"]
    files = sorted((tmp_path / "p").glob("*.parquet"))
    assert len(files) > 1  # written in shards, block by block
    for f in files:
        meta = json.loads(pq.read_schema(f).metadata[b"softlabels"])
        assert meta["set"]["digest"] == digest and meta["temperature"] == 2.0
    assert read_export_info(tmp_path / "p")["set"]["digest"] == digest
    desc = json.loads(datasets.load_from_disk(str(tmp_path / "h")).info.description)
    assert desc["set"]["digest"] == digest and desc["kind"] == "topk" and desc["k"] == 4


def test_columns_of_each_kind(sets: dict[str, Path], tmp_path: Path) -> None:
    export_set(sets["dense"], tmp_path / "d", to="parquet", topk=3)
    export_set(sets["sample"], tmp_path / "s", to="parquet")
    d = pq.read_table(tmp_path / "d").to_pylist()
    s = pq.read_table(tmp_path / "s").to_pylist()
    with open_transfer_set(sets["dense"]) as ts:
        offsets, probs, mask = read_offsets(ts), ts.probs(1.0), ts.read(SEQ_MASK)
        labels = ts.labels()
    with open_transfer_set(sets["sample"]) as ts:
        draws = ts.sparse_targets(1.0)[0]
    for i in (0, 5, len(d) - 1):
        a, b = offsets[i], offsets[i + 1]
        ids, lp = np.array(d[i]["target_token_ids"]), np.array(d[i]["target_logprobs"])
        top = np.sort(probs[a:b], 1)[:, ::-1][:, :3]
        np.testing.assert_allclose(np.exp(lp), top, rtol=1e-6)  # the K most probable, first
        np.testing.assert_allclose(np.take_along_axis(probs[a:b], ids, 1), np.exp(lp),
                                   rtol=1e-6)
        np.testing.assert_array_equal(np.array(d[i]["target_mask"])[:, 0], mask[a:b])
        hf = np.array(d[i]["labels"])
        assert hf[0] == -100
        want = np.where(mask[a:b - 1].astype(bool) & (labels[a:b - 1] >= 0),
                        labels[a:b - 1], -100)
        np.testing.assert_array_equal(hf[1:], want)
        got = np.array(s[i]["target_token_ids"]), np.exp(np.array(s[i]["target_logprobs"]))
        for p in range(b - a):  # distinct drawn classes, at their frequency
            cls, n = np.unique(draws[a + p], return_counts=True)
            np.testing.assert_array_equal(got[0][p][:len(cls)], cls)
            np.testing.assert_allclose(got[1][p][:len(cls)], n / draws.shape[1], rtol=1e-6)
            assert (np.array(s[i]["target_mask"])[p][len(cls):] == 0).all()


def test_refusals_are_one_line(sets: dict[str, Path], tmp_path: Path, npz_data: str) -> None:
    with pytest.raises(OptionError, match=r"exact at the stored temperatures \[1.0, 2.0\] only"):
        export_set(sets["topk"], tmp_path / "a", temperature=3.0)
    with pytest.raises(OptionError, match="pass --topk K"):
        export_set(sets["dense"], tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(OptionError, match="not an empty directory"):
        export_set(sets["topk"], tmp_path / "full")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OptionError, match="symbolic link"):
        export_set(sets["topk"], tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "a").exists()
    precompute(npz_data, ["mlp:16-3"], tmp_path / "ex.zarr", random_teacher=True)
    with pytest.raises(SoftlabelsError, match="example set"):
        export_set(tmp_path / "ex.zarr", tmp_path / "a")
    result = CliRunner().invoke(cli, ["export", str(sets["topk"]), "--to", "hf",
                                      str(tmp_path / "a"), "--temperature", "3"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    spec = write_tokens(tmp_path / "t.jsonl")
    precompute(spec, [TEACHER], tmp_path / "h.zarr", topk=3, nucleus=0.8, tail=2, chunk_rows=16)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "h.zarr"), "--to", "parquet",
                                      str(tmp_path / "a")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {tmp_path / 'h.zarr'}: a hybrid set's tail draws")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


def test_export_into_an_empty_directory_via_cli(sets: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    result = CliRunner().invoke(cli, ["export", str(sets["topk"]), "--to", "parquet",
                                      str(tmp_path / "e"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["sequences"] == 23 and summary["k"] == 4
    assert not (tmp_path / "e.exporting").exists()


def test_dense_set_at_an_unstored_t_is_re_tempered(sets: dict[str, Path],
                                                   tmp_path: Path) -> None:
    export_set(sets["dense"], tmp_path / "d2", to="parquet", topk=3, temperature=2.0)
    rows = pq.read_table(tmp_path / "d2").to_pylist()
    with open_transfer_set(sets["dense"]) as ts:
        assert 2.0 not in ts.temperatures
        probs, offsets = ts.probs(2.0), read_offsets(ts)  # re-tempered from the logits
    a, b = offsets[4], offsets[5]
    ids = np.array(rows[4]["target_token_ids"])
    np.testing.assert_allclose(np.exp(rows[4]["target_logprobs"]),
                               np.take_along_axis(probs[a:b], ids, 1), rtol=1e-6)
    assert read_export_info(tmp_path / "d2")["temperature"] == 2.0

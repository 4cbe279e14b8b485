"""Secrets never stored: URL user info and credential query values are redacted from what is
written (set provenance, checkpoint metadata) and what is printed (CLI output, errors, logs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hostile_servers import serve_folder

from conftest import make_npz
from softlabels.cli import cli
from softlabels.compute.blocks import precompute
from softlabels.redact import REDACTED, RedactingFilter, redact

SECRET = "s3cretPa55"


@pytest.mark.parametrize("url", [
    f"https://alice:{SECRET}@example.org/set.zarr",
    f"s3://AKIAXXXX:{SECRET}@bucket/set.zarr",
    f"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=A&X-Amz-Credential={SECRET}&"
    f"X-Amz-Signature={SECRET}",
    f"https://h/o?X-Goog-Signature={SECRET}&x=1",
    f"https://acct.blob.core.windows.net/c/set?sv=2020&sig={SECRET}",
    f"https://h/set.zarr?token={SECRET}",
    f"cannot reach http://u:{SECRET}@h:80/x (timeout)",
])
def test_redact_removes_the_secret_and_keeps_the_rest(url: str) -> None:
    shown = redact(url)
    assert SECRET not in shown and REDACTED in shown
    assert shown.split("://")[0] == url.split("://")[0]


def test_plain_text_and_urls_without_secrets_are_unchanged() -> None:
    for text in ("s3://bucket/set.zarr", "https://h/set.zarr?x=1&y=2", "a=b", "npz:/d.npz",
                 "mlp:784-10?dropout=0.5"):
        assert redact(text) == text


def test_the_log_filter_redacts_formatted_records() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "reading %s", (
        f"https://u:{SECRET}@h/x",), None)
    RedactingFilter().filter(record)
    assert SECRET not in record.getMessage()


@pytest.fixture
def served_set(tmp_path: Path) -> tuple[str, str]:
    pytest.importorskip("aiohttp")
    root = tmp_path / "www"
    root.mkdir()
    data = make_npz(tmp_path / "d.npz", n=30)
    precompute(data, ["mlp:16-3"], root / "set.zarr", temperatures=[2.0], random_teacher=True)
    return str(root), data


def test_convert_and_train_from_a_url_with_a_password_store_and_print_no_secret(
        tmp_path: Path, served_set: tuple[str, str]) -> None:
    root, data = served_set
    with serve_folder(Path(root)) as base:
        url = base.replace("http://", f"http://alice:{SECRET}@") + "/set.zarr"
        out = tmp_path / "copy.zarr"
        result = CliRunner().invoke(cli, ["convert", url, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output and REDACTED in result.output
        stored = json.loads((out / "zarr.json").read_text())
        assert SECRET not in json.dumps(stored)
        assert REDACTED in json.dumps(stored["attributes"]["softlabels"]["provenance"])
        info = CliRunner().invoke(cli, ["verify", str(out)])
        assert info.exit_code == 0, info.output

        ckpt = tmp_path / "m.pt"
        result = CliRunner().invoke(cli, ["train", "--data", data, "--model", "mlp:16-3",
                                          "--transfer-set", url, "--out", str(ckpt),
                                          "--epochs", "1"])
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output
        meta = torch.load(ckpt, weights_only=True)["meta"]
        assert SECRET not in json.dumps(meta) and REDACTED in meta["transfer_set"]["path"]


def test_an_error_naming_a_url_prints_no_secret(tmp_path: Path,
                                                served_set: tuple[str, str]) -> None:
    root, _ = served_set
    with serve_folder(Path(root)) as base:
        for url in (base.replace("http://", f"http://alice:{SECRET}@") + "/none.zarr",
                    f"{base}/none.zarr?X-Amz-Signature={SECRET}"):
            result = CliRunner().invoke(cli, ["info", url])
            assert result.exit_code != 0
            assert SECRET not in result.output and len(result.output.strip().splitlines()) == 1

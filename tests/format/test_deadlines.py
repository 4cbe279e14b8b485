"""Bounded waiting: every network wait has a deadline (`--timeout`, default 60 s), whole
requests included, and ends in one line naming the server and the wait. Hostile servers on
127.0.0.1: one accepts and never answers, one sends a byte every half second."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile_servers import hostile

from conftest import make_npz
from softlabels.cli import cli


def run(*args: object) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output, time.perf_counter() - t0


@pytest.mark.parametrize("kind", ["silent", "trickle"])
def test_a_web_server_that_stalls_is_given_up_on_after_the_timeout(kind: str) -> None:
    pytest.importorskip("aiohttp")
    with hostile(kind) as where:
        code, out, took = run("--timeout", "1.5", "info", f"http://{where}/set.zarr")
    assert code != 0 and took < 15, (took, out)
    assert f"no answer from {where}" in out and "within 1.5 s" in out and "--timeout" in out
    assert len(out.strip().splitlines()) == 1


def test_an_s3_endpoint_that_never_answers_is_given_up_on(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with hostile("silent") as where:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{where}")
        code, out, took = run("--timeout", "2", "info", "s3://bucket/set.zarr")
    assert code != 0 and took < 30, (took, out)
    assert f"no answer from {where}" in out and "within 2 s" in out, out


def test_a_dask_scheduler_that_never_answers_is_given_up_on(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    data = make_npz(tmp_path / "d.npz", n=10)
    with hostile("silent") as where:
        code, out, took = run("--timeout", "2", "precompute", "--random-teacher", "--data", data,
                              "--teacher", "mlp:16-3", "--out", tmp_path / "s.zarr",
                              "--scheduler", f"tcp://{where}")
    assert code != 0 and took < 30, (took, out)
    assert "cannot reach the Dask scheduler" in out and where in out
    assert len(out.strip().splitlines()) == 1


def test_the_timeout_reaches_the_store_options(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("aiohttp")
    from softlabels.format.location import Remote

    monkeypatch.setenv("SOFTLABELS_TIMEOUT", "7")
    timeout = Remote("https://h/set.zarr")._options()["client_kwargs"]["timeout"]
    assert timeout.total == 7  # the whole request, not each read: a trickle ends too
    s3 = Remote("s3://b/set.zarr")._options()
    assert s3["config_kwargs"]["read_timeout"] <= 7 / 4 and "retries" in s3["config_kwargs"]
    monkeypatch.setenv("SOFTLABELS_TIMEOUT", "soon")
    from softlabels.errors import SoftlabelsError

    with pytest.raises(SoftlabelsError, match="not a number of seconds"):
        Remote("https://h/set.zarr")._options()

"""One line with the right advice for each bad input of the trust round (issue 23, item 9):
a lease object with a naive timestamp or a huge pid, `--out s3://bucket` with no prefix,
`topk = 0` in a pipeline, a pipeline file that is not UTF-8 or not a page of text."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from softlabels.cli import cli
from softlabels.errors import SoftlabelsError
from softlabels.format.remote_lease import _why_stale


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize("expires,stale", [("2000-01-01T00:00:00", True),
                                           ("2999-01-01T00:00:00", False)])
def test_a_lease_with_a_naive_timestamp_is_read_as_utc(expires: str, stale: bool) -> None:
    found = {"host": "another-machine", "pid": 1, "expires_at": expires}
    assert (_why_stale(found) is not None) == stale


@pytest.mark.parametrize("pid", [10 ** 30, -(10 ** 30), 2 ** 63])
def test_a_lease_with_an_impossible_pid_on_this_host_is_stale(pid: int) -> None:
    found = {"host": socket.gethostname(), "pid": pid, "expires_at": "2999-01-01T00:00:00+00:00"}
    assert "is gone" in _why_stale(found)


def _pipeline(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "p.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_pipeline_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    code, out = run("run", _pipeline(tmp_path, b'recipe = "hinton_mnist"\n# caf\xe9\n'))
    assert code != 0 and "not UTF-8" in out and "byte 29" in out
    assert len(out.strip().splitlines()) == 1


def test_a_pipeline_path_that_is_a_device_or_huge_is_refused(tmp_path: Path) -> None:
    code, out = run("run", "/dev/zero")
    assert code != 0 and "not a regular file" in out
    code, out = run("run", _pipeline(tmp_path, "# " + "x" * (2 << 20)))
    assert code != 0 and "larger than" in out


def test_topk_zero_in_a_pipeline_is_refused_before_any_step(tmp_path: Path) -> None:
    from softlabels.experiments.tiny_lm import _check_sparse_sizes

    for bad in (0, -1, 2.5, True, "16"):
        with pytest.raises(SoftlabelsError, match="topk = .*at least 1"):
            _check_sparse_sizes({"topk": bad, "sample_k": 16})
    with pytest.raises(SoftlabelsError, match="sample_k = 0"):
        _check_sparse_sizes({"topk": 16, "sample_k": 0})
    _check_sparse_sizes({"topk": 16, "sample_k": 16})
    here = Path(__file__).parents[1] / "pipelines" / "tiny_lm.toml"
    out = tmp_path / "run"
    code, text = run("run", here, "--quick", "--out", out, "--set", "transfer_set.topk=0")
    assert code != 0 and "topk = 0" in text and len(text.strip().splitlines()) == 1
    assert not (out / "teacher.pt").exists()


@pytest.mark.parametrize("out", ["s3://bucket", "s3://bucket/", "gs://bucket"])
def test_an_output_naming_a_whole_bucket_is_one_line_before_any_work(tmp_path: Path,
                                                                     out: str) -> None:
    from conftest import make_npz

    data = make_npz(tmp_path / "d.npz", n=10)
    for args in (["precompute", "--random-teacher", "--data", data, "--teacher", "mlp:16-3",
                  "--out", out],
                 ["train", "--data", data, "--model", "mlp:16-3", "--out", out]):
        code, text = run(*args)
        assert code != 0 and "names a whole bucket" in text and "/NAME.zarr" in text, text
        assert len(text.strip().splitlines()) == 1
    from softlabels.format.location import Remote

    with pytest.raises(SoftlabelsError, match="whole bucket"):
        Remote(out).sibling(".lock")

"""`TransferSet.will_read`: a hint that blocks are read next (a local Zarr set's chunk files are
read ahead by the kernel). It changes nothing that is served and refuses nothing itself; a
damaged block hinted is still refused when it is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.reader import open_transfer_set


def test_hints_change_nothing_served_and_a_missing_chunk_is_still_refused(
        npz_data: str, out_path: Path) -> None:
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    names = [S.LABELS, S.INDEX, S.PROBS]
    with open_transfer_set(out_path) as ts:
        want = ts.read_blocks(range(ts.num_blocks), names, temperature=4.0)
    if out_path.suffix == ".zarr":
        (out_path / S.PROBS / "c" / "1" / "2" / "0").unlink()
    with open_transfer_set(out_path) as ts:
        ts.will_read(range(ts.num_blocks), names, temperature=4.0)  # a missing file: no error
        for block in (0, 1, 3):
            got = ts.read_blocks([block], names, temperature=4.0)[0]
            for name in names:
                np.testing.assert_array_equal(got[name], want[block][name])
        if out_path.suffix == ".zarr":
            with pytest.raises(IntegrityError, match="block 2 "):
                ts.read_blocks([2], names, temperature=4.0)


@pytest.mark.parametrize("suffix", ["zarr"])
def test_hints_do_not_hang_on_a_fifo_or_a_link_to_one(npz_data: str, out_path: Path,
                                               tmp_path: Path) -> None:
    """A chunk path replaced by a fifo, or by a link to one outside the set, must not hang the
    hint (opening a fifo for reading waits for a writer) nor open what the link names."""
    import os
    import threading

    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    chunks = out_path / S.PROBS / "c" / "1"
    (chunks / "2" / "0").unlink()
    os.mkfifo(chunks / "2" / "0")
    os.mkfifo(tmp_path / "outside")
    (chunks / "3" / "0").unlink()
    (chunks / "3" / "0").symlink_to(tmp_path / "outside")
    with open_transfer_set(out_path) as ts:
        hinted = threading.Event()

        def hint() -> None:
            ts.will_read(range(ts.num_blocks), [S.PROBS], temperature=4.0)
            hinted.set()

        threading.Thread(target=hint, daemon=True).start()
        assert hinted.wait(10), "will_read hung on a fifo in place of a chunk file"
        for block in (2, 3):  # the reads themselves refuse them, without waiting either
            refused: list[str] = []

            def read(block: int = block, refused: list[str] = refused) -> None:
                try:
                    ts.read_blocks([block], [S.PROBS], temperature=4.0)
                except IntegrityError as exc:
                    refused.append(str(exc))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(10)
            assert refused and "not a regular file" in refused[0], f"block {block} hung"

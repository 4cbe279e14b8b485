"""A block's values are checked on its first checked read while the set is open; later reads
skip that check only for bytes that match the same recorded checksums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checksums import forge_checksums

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.errors import IntegrityError
from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.reader import open_transfer_set


@pytest.fixture
def made(npz_data: str, tmp_path: Path) -> Path:
    """A Zarr set: the damage is written while the set is open to read (an HDF5 file cannot be
    opened for writing while it is open)."""
    out_path = tmp_path / "s.zarr"
    precompute(npz_data, ["mlp:16-8-3"], out_path, temperatures=[1, 4], chunk_rows=CHUNK,
               random_teacher=True)
    return out_path


def _bad_label(path: Path, *, forge: bool) -> None:
    """Row 40 (block 2) gets a label out of range for 3 classes; with `forge`, block 2's
    checksums are recorded again to match it."""
    with open_store(path, "r+") as store:
        labels = store.read(S.LABELS)
        labels[40] = 7
        store.write(S.LABELS, slice(None), labels)
    if forge:
        forge_checksums(path, 2)


def test_a_block_changed_after_a_good_read_is_refused_on_the_next(made: Path) -> None:
    with open_transfer_set(made) as ts:
        first = ts.read_block(2)
        np.testing.assert_array_equal(ts.read_block(2)[S.LABELS], first[S.LABELS])
        _bad_label(made, forge=True)  # even with its checksums recorded anew
        with pytest.raises(IntegrityError, match="block 2 "):
            ts.read_block(2)


@pytest.mark.parametrize("checked_first", [True, False])
def test_reads_without_checksums_check_values_every_time(made: Path,
                                                         checked_first: bool) -> None:
    with open_transfer_set(made) as ts:
        ts.read_block(2, checksum=checked_first)
        _bad_label(made, forge=False)
        with pytest.raises(IntegrityError, match="block 2 .*labels outside"):
            ts.read_block(2, checksum=False)

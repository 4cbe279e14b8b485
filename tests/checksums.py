"""Test helpers that rewrite a set's block checksums: to forge a matching checksum over edited
values (the value checks must still refuse them), and to turn a set into its format version 1
form (one `block_checksum` per block over every row array), as older softlabels wrote it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softlabels.format import schema as S
from softlabels.format.backends import open_store
from softlabels.format.layout import Layout


def _block(store: object, layout: Layout, block: int) -> dict[str, np.ndarray]:
    start, stop = layout.block_range(block)
    return {n: store.read(n, (slice(None),) * S.row_axis(n) + (slice(start, stop),))
            for n in layout.arrays()}


def forge_checksums(path: Path, block: int) -> None:
    """Record checksums that match block `block`'s stored rows, whatever they hold."""
    with open_store(path, "r+") as store:
        layout = Layout.from_meta(store.get_meta())
        arrays = _block(store, layout, block)
        if store.get_meta()["format_version"] == 1:
            store.write(S.BLOCK_CHECKSUM, slice(block, block + 1),
                        np.array([S.block_checksum_v1(arrays)], dtype=np.uint64))
        else:
            store.write(S.ARRAY_CHECKSUM, (slice(block, block + 1), slice(None)),
                        layout.block_checksums(arrays)[None])


def as_version_1(path: Path, *, checksums: bool = True, downgrade: bool = False) -> None:
    """Rewrite a complete set as format version 1 wrote it: `block_checksum` (B,) instead of
    `array_checksum`, or no checksums at all (a set from before block checksums, which also
    predates the metadata `digest` and the `sparse` key). `downgrade`: without checksums but
    keeping that metadata (the downgrade attack: readers must refuse it)."""
    with open_store(path, "r+") as store:
        meta = store.get_meta()
        layout = Layout.from_meta(meta)
        sums = np.array([S.block_checksum_v1(_block(store, layout, b))
                         for b in range(layout.num_blocks)], dtype=np.uint64)
        old = {k: v for k, v in meta.items()
               if checksums or downgrade or k not in ("digest", "sparse")}
        store.set_meta({**old, "format_version": 1})
        checksums = checksums and not downgrade
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r+") as f:
            del f[S.ARRAY_CHECKSUM]
            if checksums:
                f.create_dataset(S.BLOCK_CHECKSUM, data=sums, chunks=(1,))
        return
    import shutil

    import zarr

    shutil.rmtree(path / S.ARRAY_CHECKSUM)
    if checksums:
        group = zarr.open_group(str(path), mode="r+")
        group.create_array(S.BLOCK_CHECKSUM, shape=sums.shape, dtype=sums.dtype, chunks=(1,),
                           dimension_names=(S.BLOCKS,))[:] = sums


def flip_byte(path: Path, name: str, chunk: tuple[int, ...]) -> None:
    """Flip one bit in the middle of one stored chunk of array `name` (Zarr or HDF5)."""
    if path.suffix == ".zarr":
        target, offset = path.joinpath(*name.split("/"), "c", *map(str, chunk)), None
    else:
        import h5py

        with h5py.File(path, "r") as f:
            ds = f[name]
            info = ds.id.get_chunk_info_by_coord(tuple(c * s for c, s in zip(chunk, ds.chunks)))
        target, offset = path, info.byte_offset + info.size // 2
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x10
    target.write_bytes(bytes(raw))


def block_chunk(name: str, shape: tuple[int, ...], block: int, lead: int = 0,
                ) -> tuple[int, ...]:
    """The chunk coordinates of block `block` (of one chunk along rows) of array `name`; for an
    array whose rows lie on axis 1, at leading index `lead`."""
    if S.row_axis(name) == 1:
        return (lead, block, *[0] * (len(shape) - 2))
    return (block, *[0] * (len(shape) - 1))

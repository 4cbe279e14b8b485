"""The ecosystem's array tools read a set with named dimensions: xarray (Zarr) and HDF5 labels."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import CHUNK
from softlabels.compute.blocks import precompute
from softlabels.format.operations import convert

# Every array of these sets, with the dimension names docs/FORMAT.md gives.
DENSE = {"logits": ("rows", "classes"), "probs": ("temperature", "rows", "classes"),
         "member_logits": ("member", "rows", "classes"), "labels": ("rows",),
         "index": ("rows",), "sample_hash": ("rows",), "view_seed": ("rows",),
         "block_done": ("blocks",), "array_checksum": ("blocks", "checksum_slots")}
TOPK = {"indices": ("rows", "k"), "logits": ("rows", "k"), "logsumexp": ("rows", "temperature")}
SAMPLE = {"indices": ("temperature", "rows", "k")}


def open_zip(path: Path) -> zarr.Group:
    return zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")


@pytest.mark.parametrize("zipped", [False, True], ids=["zarr", "zarr.zip"])
def test_xarray_opens_a_set_with_named_dimensions_and_zarr_values(
        tmp_path: Path, npz_data: str, zipped: bool) -> None:
    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-5-3"], path, temperatures=[1, 4, 20],
               chunk_rows=CHUNK, keep_members=True, views=2, augment="hflip", random_teacher=True)
    if zipped:
        convert(path, tmp_path / "set.zarr.zip")
        path = tmp_path / "set.zarr.zip"
    group = open_zip(path) if zipped else zarr.open_group(path, mode="r")
    store = zarr.storage.ZipStore(str(path), mode="r") if zipped else path
    ds = xr.open_zarr(store, consolidated=False)
    assert {n: ds[n].dims for n in ds.data_vars} == DENSE
    assert ds.sizes == {"rows": 206, "classes": 3, "temperature": 3, "member": 2, "blocks": 13,
                        "checksum_slots": 10}  # 5 one-slot row arrays, probs at 3 T, 2 members
    for name in DENSE:  # the same values, labels 0 and uint64 hashes included (no masking)
        value = ds[name].values
        np.testing.assert_array_equal(value, group[name][:], err_msg=name)
        assert value.dtype == group[name].dtype


@pytest.mark.parametrize("kind,opts,want", [("topk", {"topk": 2}, TOPK),
                                            ("sample", {"sample_k": 4}, SAMPLE)])
def test_xarray_opens_the_group_of_a_sparse_set(tmp_path: Path, npz_data: str, kind: str,
                                                opts: dict[str, int],
                                                want: dict[str, tuple[str, ...]]) -> None:
    path = tmp_path / "sparse.zarr"
    precompute(npz_data, ["mlp:16-8-3"], path, temperatures=[1, 4], chunk_rows=CHUNK, **opts,
               random_teacher=True)
    ds = xr.open_zarr(path, group=kind, consolidated=False)
    assert {n: ds[n].dims for n in ds.data_vars} == want
    group = zarr.open_group(path, mode="r")
    for name in want:
        np.testing.assert_array_equal(ds[name].values, group[f"{kind}/{name}"][:])


def test_inputs_and_hdf5_arrays_carry_dimension_names(tmp_path: Path, npz_data: str) -> None:
    common = dict(temperatures=[1, 4], chunk_rows=CHUNK, store_inputs=True)
    precompute(npz_data, ["mlp:16-8-3"], tmp_path / "s.zarr", **common, random_teacher=True)
    precompute(npz_data, ["mlp:16-8-3"], tmp_path / "s.h5", **common, random_teacher=True)
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert ds["inputs"].dims == ("rows", "input_1", "input_2", "input_3")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert [d.label for d in f["probs"].dims] == ["temperature", "rows", "classes"]
        assert [d.label for d in f["inputs"].dims] == ["rows", "input_1", "input_2", "input_3"]
        np.testing.assert_array_equal(f["inputs"][:], ds["inputs"].values)


def test_tensorstore_reads_every_array_bit_for_bit_with_its_dimension_names(
        tmp_path: Path, npz_data: str) -> None:
    import tensorstore

    path = tmp_path / "set.zarr"
    precompute(npz_data, ["mlp:16-8-3", "mlp:16-5-3"], path, temperatures=[1, 4],
               chunk_rows=CHUNK, keep_members=True, views=2, augment="hflip", random_teacher=True)
    precompute(npz_data, ["mlp:16-8-3"], tmp_path / "topk.zarr", temperatures=[1, 4],
               chunk_rows=CHUNK, topk=2, random_teacher=True)
    for root, names in ((path, DENSE), (tmp_path / "topk.zarr",
                                        {f"topk/{n}": d for n, d in TOPK.items()})):
        group = zarr.open_group(root, mode="r")
        for name, dims in names.items():
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{root}/{name}"}}
            store = tensorstore.open(spec, read=True).result()
            assert store.domain.labels == dims, name
            value = store.read().result()
            assert value.dtype == group[name].dtype
            np.testing.assert_array_equal(value, group[name][:], err_msg=name)

"""Every target kind is one codec behind one interface (format/targets): each is run through the
same contract here, so a new kind fails until it does everything the stages ask of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softlabels.errors import OptionError
from softlabels.format import schema as S
from softlabels.format.layout import SPARSE_KINDS, Layout
from softlabels.format.targets import (
    Dense,
    Hybrid,
    Sampled,
    TargetKind,
    TeacherOutputs,
    TopK,
    refuse_unstored,
)

TEMPS = (1.0, 3.0)
N, C = 48, 20


def layouts() -> dict[str, Layout]:
    """One layout per kind of target (and per storage of top-k), as the writer makes them."""
    base = {"num_rows": N, "num_classes": C, "temperatures": TEMPS, "dtype": "float32"}
    return {
        "dense": Layout(**base),
        "dense+members": Layout(**base, num_members=2),
        "topk": Layout(**base, topk=5),
        "topk shifted": Layout(**base, topk=5, num_sequences=4, topk_dtype="float16"),
        "sample": Layout(**base, sample_k=6),
        "hybrid": Layout(**base, hybrid=Hybrid(k=4, nucleus=0.8, tail=3)),
        "hybrid 8-bit": Layout(**base, hybrid=Hybrid(k=4, nucleus=0.8, tail=3, quantize=8)),
    }


def teacher(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, TeacherOutputs]:
    g = torch.Generator().manual_seed(seed)
    members = torch.randn(2, N, C, generator=g) * 3
    z = members.mean(0)
    probs = torch.stack([torch.softmax(z / t, -1) for t in TEMPS])
    return z, members, TeacherOutputs(z, lambda: probs, probs.__getitem__, members)


def uniforms(seed: int = 7):  # noqa: ANN201
    g = torch.Generator().manual_seed(seed)
    return lambda leading, per_row: torch.rand(*leading, N, per_row, generator=g)


def stored(layout: Layout, out: TeacherOutputs) -> dict[str, np.ndarray]:
    """What the writer stores: the codec's arrays in their storage dtypes."""
    target = layout.target
    encoded = target.encode(out, TEMPS, uniforms() if target.needs_uniforms else None)
    want = layout.arrays()
    return {name: t.to(getattr(torch, want[name][1])).numpy() for name, t in encoded.items()}


def at(arrays: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The arrays as a block read at the k-th stored temperature returns them."""
    return {name: a[k] if name in S.TEMPERATURE_AXIS else a for name, a in arrays.items()}


@pytest.mark.parametrize("name", list(layouts()))
def test_each_codec_encodes_exactly_the_arrays_its_layout_declares(name: str) -> None:
    layout = layouts()[name]
    _, _, out = teacher()
    arrays = stored(layout, out)
    declared = layout.target.arrays(N, len(TEMPS), layout.dtype, layout.probs_dtype, C)
    assert declared.items() <= layout.arrays().items()
    assert {n: (a.shape, str(a.dtype)) for n, a in arrays.items()} == declared
    assert set(layout.target.served(True)) <= set(arrays)
    assert set(layout.target.served(False)) <= set(arrays)
    assert layout.target.problems(arrays, C, TEMPS, layout.dtype) is None


@pytest.mark.parametrize("name", list(layouts()))
def test_decoded_targets_are_the_teachers_probabilities(name: str) -> None:
    """Dense and top-k targets are p_T exactly (top-k at its k classes); sampled and hybrid
    targets are estimates whose weights sum to about 1 and sit on real classes."""
    layout = layouts()[name]
    target = layout.target
    z, _, out = teacher()
    arrays = stored(layout, out)
    for k, t in enumerate(TEMPS):
        p = torch.softmax(z.double() / t, -1).numpy()
        got = target.decode(at(arrays, k), t, k, TEMPS)
        assert all(isinstance(x, torch.Tensor) for x in got)
        if not target.sparse:
            np.testing.assert_allclose(got[0].numpy(), p, atol=1e-6)
            continue
        classes, weights = got[0].numpy(), got[1].numpy()
        assert classes.dtype == np.int64 and classes.shape == weights.shape
        assert classes.min() >= 0 and classes.max() < C
        if target.name == "topk":
            tol = 2e-3 if target.shifted else 1e-6  # float16 shifted logits
            np.testing.assert_allclose(weights, np.take_along_axis(p, classes, 1), atol=tol)
            largest = np.argsort(-p, 1)[:, :5]  # the k most probable, in the stored order
            assert (np.sort(classes, 1) == np.sort(largest, 1)).all()
            assert (classes == (np.sort(largest, 1) if target.shifted else largest)).all()
        elif target.name == "sample":  # k draws of 1/k each
            np.testing.assert_allclose(weights.sum(1), 1, rtol=1e-6)
        else:  # importance weights: the mass is 1 in expectation, over the rows
            assert abs(weights.sum(1).mean() - 1) < 0.2
        dense = target.densify(classes, weights, C)
        assert dense.shape == (N, C)
    assert (len(target.decode(at(arrays, 0), TEMPS[0], 0, TEMPS)) == 3) == (target.name == "hybrid")


@pytest.mark.parametrize("name", list(layouts()))
def test_verify_finds_the_teacher_in_what_it_stored_and_not_another(name: str) -> None:
    layout = layouts()[name]
    target = layout.target
    z, _, out = teacher()
    arrays = stored(layout, out)
    live = z.numpy()
    if not target.recomputable:
        with pytest.raises(ValueError, match="random draws"):
            target.live_differences(arrays, live, TEMPS, layout.dtype)
        return
    tol = 1e-2 if "float16" in (layout.dtype, layout.topk_dtype) or "8-bit" in name else 1e-5
    assert target.live_differences(arrays, live, TEMPS, layout.dtype).max() <= tol
    other = teacher(seed=1)[0].numpy()
    assert target.live_differences(arrays, other, TEMPS, layout.dtype).max() > 0.1


@pytest.mark.parametrize("name", list(layouts()))
def test_metadata_names_the_same_codec_both_ways(name: str) -> None:
    layout = layouts()[name]
    meta = layout.to_meta() | {"teacher": {"members": [{}, {}]}}
    again = Layout.from_meta(meta)
    assert again.target == layout.target and again.arrays() == layout.arrays()
    assert (layout.target.to_meta() is None) == (layout.target.name == "dense")


def test_every_kind_the_format_names_has_a_codec() -> None:
    names = {layout.target.name for layout in layouts().values()}
    assert names == {"dense", *SPARSE_KINDS}
    for codec in (Dense(), TopK(3), Sampled(3), Hybrid(k=2, nucleus=0.5, tail=1)):
        assert isinstance(codec, TargetKind)  # the protocol's attributes and methods


@pytest.mark.parametrize("name", list(layouts()))
def test_export_ranks_most_probable_first(name: str) -> None:
    layout = layouts()[name]
    _, _, out = teacher()
    arrays = at(stored(layout, out), 0)
    if layout.target.name == "hybrid":  # importance weights have no export column
        with pytest.raises(OptionError, match="hybrid"):
            layout.target.ranked(arrays, 1.0, 0, None)
        return
    got = layout.target.ranked(arrays, 1.0, 0, 4 if not layout.target.sparse else None)
    assert got["ids"].shape == got["lp"].shape == got["valid"].shape
    lp = np.where(got["valid"], got["lp"], -np.inf)
    if layout.target.name == "sample":  # distinct classes drawn, their frequencies
        np.testing.assert_allclose(np.exp(lp).sum(1), 1, rtol=1e-6)
    else:
        assert (np.diff(lp, axis=1) <= 0).all()


def test_a_sparse_set_refuses_a_temperature_it_did_not_store_in_one_message() -> None:
    for layout in layouts().values():
        if layout.target.sparse:
            with pytest.raises(OptionError, match=r"sparse \(\w+\): its targets are exact at "
                               r"the stored temperatures \[1.0, 3.0\] only, not 2.0"):
                refuse_unstored("S", layout.target, 2.0, TEMPS, None)
        else:
            refuse_unstored("S", layout.target, 2.0, TEMPS, None)  # re-tempered from logits
        refuse_unstored("S", layout.target, 3.0, TEMPS, 1)

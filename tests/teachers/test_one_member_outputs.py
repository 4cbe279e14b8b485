"""The teacher's outputs without extra passes (issue 22.1): one member's logits are its own
output (no stacked copy), and the ensemble's probabilities are written per temperature into one
tensor; every value is the bit pattern the plain formulas give, which is what a set stores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softlabels.teachers.ensemble import Teacher
from softlabels.tempering import ensemble_probs, tempered_log_softmax, tempered_softmax

TEMPS = [1.0, 2.0, 4.0, 0.5]


def plain_probs(z: torch.Tensor, temps: list[float], combine: str) -> torch.Tensor:
    """The ensemble's probabilities as the formulas read (FORMAT.md): what sets stored before."""
    if combine == "mean-logits":
        m = z.float().mean(dim=0)
        return torch.stack([torch.softmax(m / t, dim=-1) for t in temps])
    up = z if z.dtype == torch.float64 else z.float()
    return torch.stack([torch.softmax(up / t, dim=-1).mean(dim=0) for t in temps])


def logits(members: int, dtype: torch.dtype, shape: tuple[int, ...] = (5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(members)
    z = torch.randn(members, *shape, generator=g, dtype=torch.float64) * 8
    z[..., 0, 0] = -0.0  # signed zero and a tie survive as they are
    z[..., 1, :2] = 3.0
    return z.to(dtype)


@pytest.mark.parametrize("combine", ["mean-logits", "mean-probs"])
@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_ensemble_probs_are_the_formulas_bit_for_bit(combine: str, members: int,
                                                     dtype: torch.dtype) -> None:
    z = logits(members, dtype, (2, 5, 7))  # sequence-shaped (M, B, L, V) too
    got, want = ensemble_probs(z, TEMPS, combine), plain_probs(z, TEMPS, combine)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.numpy().tobytes() == want.numpy().tobytes()


def test_ensemble_probs_still_differentiate() -> None:
    """Outside inference the result keeps its graph (the per-slice writes have none)."""
    z = logits(1, torch.float32).requires_grad_()
    w = torch.randn(len(TEMPS), 5, 7)
    (ensemble_probs(z, TEMPS, "mean-logits") * w).sum().backward()
    got, z.grad = z.grad, None
    (plain_probs(z, TEMPS, "mean-logits") * w).sum().backward()
    assert got is not None and torch.allclose(got, z.grad)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_tempering_at_one_is_the_division(temperature: float) -> None:
    z = logits(1, torch.float32)[0]
    assert tempered_softmax(z, temperature).numpy().tobytes() == \
        torch.softmax(z / temperature, -1).numpy().tobytes()
    assert tempered_log_softmax(z, temperature).numpy().tobytes() == \
        torch.log_softmax(z / temperature, -1).numpy().tobytes()


class Half(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).half()  # a member whose output is not float32


@pytest.mark.parametrize("model", [lambda: nn.Linear(6, 9), Half])
def test_one_member_logits_are_its_float32_output(model) -> None:
    m = model()
    x = torch.randn(4, 6)
    z = Teacher([m], device="cpu").member_logits(x)
    with torch.inference_mode():
        want = m(x).float()
    assert z.shape == (1, 4, 9) and z.dtype == torch.float32
    assert z[0].numpy().tobytes() == want.numpy().tobytes()


def test_members_are_stacked_in_order() -> None:
    torch.manual_seed(1)
    a, b = nn.Linear(6, 9), nn.Linear(6, 9)
    x = torch.randn(4, 6)
    z = Teacher([a, b], device="cpu").member_logits(x)
    with torch.inference_mode():
        assert torch.equal(z, torch.stack([a(x), b(x)]))

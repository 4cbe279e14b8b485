"""What a training run returns (`TrainResult`) and reports as it goes (`Callback`), whatever its
kind of rows (trainer.py runs both)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

Callback = Callable[[str, dict[str, Any]], None]  # (event: "batch" | "epoch", info)


@dataclass
class TrainResult:
    model: nn.Module
    spec: str
    history: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    unit: str = "rows"  # what a row is: "rows" (examples) or "positions" (token positions)
    seconds: float = 0.0
    rank: int = 0

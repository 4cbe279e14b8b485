"""Write the tiny_lm pipeline's text: CPython 3.11's standard-library source, split by file.

    python data/make_tiny_lm_text.py [STDLIB_DIR]

Top-level modules of the standard library (Lib/*.py), in name order; every 10th file goes to the
held-out text, the rest to the training text, each cut at a byte budget. Provenance and license:
data/README.md.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

TRAIN_BYTES, HELD_OUT_BYTES = 300_000, 40_000
HERE = Path(__file__).parent / "tiny_lm"


def main() -> None:
    lib = Path(sys.argv[1] if len(sys.argv) > 1 else sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.is_file())
    train, held, names = bytearray(), bytearray(), {"train": [], "held_out": []}
    for i, f in enumerate(files):
        text, part = f.read_bytes(), ("held_out" if i % 10 == 9 else "train")
        buf, cap = (held, HELD_OUT_BYTES) if part == "held_out" else (train, TRAIN_BYTES)
        if len(buf) < cap:
            buf += text[:cap - len(buf)]
            names[part].append(f.name)
    HERE.mkdir(exist_ok=True)
    (HERE / "train.txt").write_bytes(bytes(train))
    (HERE / "held_out.txt").write_bytes(bytes(held))
    (HERE / "FILES.txt").write_text("".join(f"{part}: {' '.join(n)}\n"
                                            for part, n in names.items()))
    print(f"{len(train)} + {len(held)} bytes from {lib}")


if __name__ == "__main__":
    main()

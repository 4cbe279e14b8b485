"""`softlabels report`: PNG plots and a markdown summary a team reads before using someone else's
transfer set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softlabels.errors import SoftlabelsError
from softlabels.format.info import Provenance, SetInfo
from softlabels.safe_write import save_figure, write_text


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _set_statistics(ts: Any, bins: int = 40) -> dict[str, Any]:
    """One pass over the blocks, reading only labels and the soft targets at every stored T,
    checked (`TransferSet.read_block`: damage is named, not plotted): per-T histograms of
    confidence and entropy, mean probability by true label (C x C per T), and top-1 accuracy
    on labelled rows."""
    import numpy as np

    from softlabels.format import schema as S
    from softlabels.train.blocks import block_targets, needed_arrays

    k, c = len(ts.temperatures), ts.num_classes
    conf_hist = np.zeros((k, bins), np.int64)
    ent_hist = np.zeros((k, bins), np.int64)
    by_label = np.zeros((k, c, c))
    counts = np.zeros(c, np.int64)
    correct = labelled = 0
    ent_max = float(np.log(c))
    # labels and the targets at every stored T at once (probs, top-k or samples)
    names = [n for n in needed_arrays(ts, ts.temperatures[0]) if n not in (S.INDEX, S.VIEW_SEED)]
    for block in range(ts.num_blocks):
        arrays = ts.read_block(block, names)
        labels = arrays[S.LABELS]
        known = labels >= 0
        counts += np.bincount(labels[known], minlength=c)[:c]
        labelled += int(known.sum())
        for i, t in enumerate(ts.temperatures):
            at_t = {n: a[i] if n in S.TEMPERATURE_AXIS else a for n, a in arrays.items()}
            targets = block_targets(ts, at_t, t)
            p = targets[0] if len(targets) == 1 else ts.densify(*targets[:2])
            if i == 0:  # dense or sparse
                correct += int((p.argmax(1)[known] == labels[known]).sum())
            conf_hist[i] += np.histogram(p.max(1), bins=bins, range=(0, 1))[0]
            ent = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
            ent_hist[i] += np.histogram(ent, bins=bins, range=(0, ent_max))[0]
            np.add.at(by_label[i], labels[known], p[known])
    by_label /= np.maximum(counts, 1)[None, :, None]
    return {"conf_hist": conf_hist, "ent_hist": ent_hist, "by_label": by_label, "bins": bins,
            "ent_max": ent_max, "accuracy": correct / labelled if labelled else None,
            "labelled": labelled}


def _histograms(ts: Any, st: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    edges_c = np.linspace(0, 1, st["bins"] + 1)
    edges_e = np.linspace(0, st["ent_max"], st["bins"] + 1)
    for i, t in enumerate(ts.temperatures):
        axes[0].stairs(st["conf_hist"][i], edges_c, label=f"T={t:g}")
        axes[1].stairs(st["ent_hist"][i], edges_e, label=f"T={t:g}")
    axes[0].set(xlabel="teacher confidence (largest probability)", ylabel="rows",
                title="Confidence per temperature")
    axes[1].set(xlabel="entropy of the soft target (nats)", ylabel="rows",
                title="Entropy per temperature")
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _heatmaps(ts: Any, st: dict[str, Any], path: Path) -> None:
    plt = _plt()
    k = len(ts.temperatures)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.6), squeeze=False)
    for i, t in enumerate(ts.temperatures):
        ax = axes[0][i]
        image = ax.imshow(st["by_label"][i], cmap="viridis", vmin=0)
        ax.set(title=f"T={t:g}", xlabel="class of the probability", ylabel="true label")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("Mean teacher probability by true label")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def transfer_set_report(path: str | Path, out: str | Path) -> dict[str, Any]:
    """PNG plots and a markdown summary a team reads before using someone else's set."""
    from softlabels.format.reader import open_transfer_set

    out = Path(out)
    with open_transfer_set(path) as ts:
        if ts.layout.kind == "sequences":
            raise SoftlabelsError(
                f"{ts.path} is a sequence set ({ts.layout.num_sequences} sequences, "
                f"{ts.num_rows} positions): report plots per-example class mass, expected an "
                f"example set; describe it with `softlabels info {ts.path}` and check it with "
                f"`softlabels verify {ts.path}`")
        st = _set_statistics(ts)  # before anything is written: a refused set leaves nothing
        out.mkdir(parents=True, exist_ok=True)
        _histograms(ts, st, out / "confidence_entropy.png")
        _heatmaps(ts, st, out / "class_mass.png")
        summary, info = ts.summary(), ts.info
    write_text(out / "summary.md", _summary_markdown(summary, info, st), what="report")
    return {"accuracy": st["accuracy"], "labelled_rows": st["labelled"], "out": str(out)}


def _summary_markdown(s: dict[str, Any], info: SetInfo, st: dict[str, Any]) -> str:
    """`s`: the set's summary (path, backend, size, layout); `info`: what it describes."""
    teacher, data = info.teacher, info.dataset
    acc = (f"{st['accuracy']:.4f} on {st['labelled']} labelled rows"
           if st["accuracy"] is not None else "no labelled rows")
    lines = [
        f"# Transfer set `{s['path']}`", "",
        f"- format version {s['format_version']}, status {s['status']}, {s['backend']}, "
        f"{s['bytes'] / 2**20:.2f} MiB",
        f"- {s['num_rows']} rows of {info.num_examples} examples, {s['num_classes']} classes, "
        f"temperatures {s['temperatures']}", f"- teacher top-1 accuracy: {acc}",
        f"- made {info.created_at} on {info.device} at {info.precision}; "
        + ", ".join(f"{k} {v}" for k, v in (info.versions or {}).items()), "",
        f"## Teacher ({teacher.combine})", "", "| member | weights sha256 |", "|---|---|",
        *[f"| `{m.name}` (`{m.spec}`) | `{m.sha256}` |" for m in teacher.members], "",
        "## Data", "", f"- spec `{data.spec}`, {data.length} examples",
        f"- fingerprint `{data.fingerprint}`", "",
    ]
    origin = _provenance_lines(info.provenance)
    if origin:
        lines += ["## Provenance", "", *origin, ""]
    lines += ["## Plots", "", "![confidence and entropy](confidence_entropy.png)", "",
              "![class mass](class_mass.png)", ""]
    return "\n".join(lines)



def _provenance_lines(prov: Provenance | None) -> list[str]:
    """A line for every set this one was cut, merged or converted from, or its import."""
    if prov is None:
        return []
    lines = []
    for key in ("subset_of", "merged_from", "converted_from"):
        value = getattr(prov, key)
        for src in value if isinstance(value, tuple) else (value,) if value else ():
            lines.append(f"- {key.replace('_', ' ')} `{src.path}` (fingerprint "
                         f"`{(src.fingerprint or '')[:16]}…`)")
    if prov.imported_from is not None:
        imported = prov.imported_from
        lines.append(f"- imported ({imported.format})"
                     + (f" from `{imported.path}`" if imported.path else ""))
    return lines

"""The package tree is the architecture (DESIGN.md section 2): imports point one way, from a
later stage to an earlier one, and no two modules import each other. Read from the source's own
import statements (those inside functions too), so a dodged cycle still counts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "softlabels"
# Stage order: a module may import its own package and any package of a lower rank. The shared
# modules at the root (errors, progress, tempering, preprocessing, specs) are below everything;
# options.py, one typed options object per command, sits above the format whose choices it checks.
RANK = {"shared": 0, "format": 1, "options": 2, "sources": 3, "teachers": 3, "compute": 4,
        "train": 5, "sets": 6, "integrations": 7, "experiments": 8, "cli": 9}
SAME_RANK_ALLOWED = {("teachers", "sources")}  # a teacher may read its data's kind (tokens)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "shared"


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for n in ast.walk(block)}  # annotations only: no runtime dependency
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def test_no_module_imports_the_package_root() -> None:
    offenders = sorted(m for m, deps in imports().items() if "softlabels" in deps
                       and m not in ("softlabels", "softlabels.__main__"))
    assert offenders == [], f"import the module you need, not softlabels itself: {offenders}"


def test_no_two_modules_import_each_other() -> None:
    edges = imports()
    pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges[b]})
    assert pairs == [], f"modules that import each other: {pairs}"


def test_imports_follow_the_stage_order() -> None:
    upward = []
    for module, deps in imports().items():
        if module in ("softlabels", "softlabels.__main__"):
            continue  # the root re-exports the public API; __main__ runs the CLI
        src = layer(module)
        for dep in deps:
            dst = layer(dep)
            if dst == src or dep == "softlabels._version":
                continue
            if RANK[dst] > RANK[src] or (RANK[dst] == RANK[src]
                                         and (src, dst) not in SAME_RANK_ALLOWED):
                upward.append(f"{module} -> {dep}")
    assert upward == [], "imports against the stage order:\n" + "\n".join(sorted(upward))


def test_tests_use_only_public_modules() -> None:
    """A test drives the package through its public modules (issue 20): a private module
    (`softlabels.format._zarr`, `_hdf5`, ...) is reached through `format.backends.open_store`
    and the `format.store.Store` interface, so a backend can change without the tests."""
    private = []
    for path in (PACKAGE.parent / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            private += [f"{path.relative_to(PACKAGE.parent)}: {n}" for n in names
                        if n.startswith("softlabels.")
                        and any(p.startswith("_") and p != "__main__" for p in n.split(".")[1:])]
    assert not private, private

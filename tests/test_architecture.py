"""Imports point one way (docs/architecture.md): each part imports only parts of lower layers, and no module
imports itself back through a chain. Read from the source with ``ast``, function-level imports included."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).parents[1] / "lightning_msif"

# Bottom to top; a part may import from its own folder and from lower layers only.
LAYERS: List[Set[str]] = [
    {"errors", "version", "atomic"},
    {"core"},
    {"distributed", "trust"},
    {"snapshots", "reports"},
    {"scoring_job"},
    {"resolve"},
    {"rescoring"},
    {"callbacks", "config", "evaluation", "demo"},
    {"cli"},
    {"__main__", "__init__"},
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> Set[str]:
    """Package-internal modules imported anywhere in ``path`` (``a.b`` names relative to the package)."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [a.name for a in node.names]
            for name in names:  # `from . import cg` imports the submodule cg
                candidate = [*target, name]
                if (PACKAGE.joinpath(*candidate).with_suffix(".py")).exists() or PACKAGE.joinpath(*candidate).is_dir():
                    out.add(".".join(candidate))
            if target and (PACKAGE.joinpath(*target).with_suffix(".py").exists() or PACKAGE.joinpath(*target).is_dir()):
                out.add(".".join(target))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_msif."):
            out.add(node.module[len("lightning_msif."):])
    out.discard(".".join(here))
    return out


GRAPH: Dict[str, Set[str]] = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_part_has_a_layer():
    parts = {m.split(".")[0] for m in GRAPH}
    assert parts <= set(LAYER), sorted(parts - set(LAYER))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    part = module.split(".")[0]
    for target in GRAPH[module]:
        other = target.split(".")[0]
        if other != part:
            assert LAYER[other] < LAYER[part], f"{module} imports {target}: {part} is not above {other}"


def test_no_import_cycle():
    state: Dict[str, int] = {}

    def visit(m: str, path: List[str]) -> None:
        state[m] = 1
        for t in GRAPH.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(t):], t]))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_core_needs_neither_lightning_nor_the_tracker():
    """The math core is pure torch: usable without Lightning, W&B or OmegaConf."""
    for path in (PACKAGE / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] not in {"lightning", "wandb", "omegaconf", "hydra"}, f"{path.name}: {name}"

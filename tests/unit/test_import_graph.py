"""No import cycle among the project's modules, and the model reaches its kernels only through
KernelOps.

The graph is read with `ast` (nothing is imported): every .py under engine_svc/, kernels/ and
tokenizer_svc/ is a module (a package's __init__.py is the package); each import statement in
module A that names project module B is an edge A -> B, wherever it stands: module top, inside a
function, or under `if TYPE_CHECKING:`. Type-only imports count: a cycle only type checkers
follow still ties the two modules together, so the project has none of those either.
`from P import name` is an edge to P.name where that is a module, else to P; relative imports
resolve against the importing module's package. Importing a.b is an edge to a.b only (a
package's own imports are its __init__'s edges).

    .venv/bin/python -m tests.unit.test_import_graph    # print every module's project imports
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine_svc", "kernels", "tokenizer_svc")
MODEL = "engine_svc.models.llama"


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a .py file under root (a package's __init__ is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of the given top-level packages: name -> file."""
    return {module_name(path, root): path
            for package in packages for path in sorted((root / package).rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `importer` imports anywhere in its file."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, importer, is_package)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    found.add(target)
                elif base in modules:
                    found.add(base)
    found.discard(importer)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(following) == 1:
                return path[path.index(following):] + [following]
            elif following not in state:
                state[following] = 1
                path.append(following)
                stack.append(iter(sorted(graph.get(following, ()))))
    return None


def test_the_project_has_no_import_cycle() -> None:
    graph = import_graph(REPO_ROOT)
    assert MODEL in graph and "kernels.backend" in graph and len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_model_reaches_kernels_only_through_kernel_ops() -> None:
    imports = import_graph(REPO_ROOT)[MODEL]
    backend_modules = sorted(m for m in imports if m.startswith(("kernels.cpu", "kernels.triton")))
    assert backend_modules == [], f"{MODEL} imports backend modules directly: {backend_modules}"
    assert {m for m in imports if m.startswith("kernels")} == {"kernels.backend"}


def test_kernels_import_nothing_from_the_services() -> None:
    graph = import_graph(REPO_ROOT)
    upward = sorted((module, target) for module, targets in graph.items()
                    if module.startswith("kernels") for target in targets
                    if not target.startswith("kernels"))
    assert upward == [], f"kernels/ imports service modules: {upward}"


def test_a_planted_cycle_is_found(tmp_path: Path) -> None:
    """The checker itself: a cycle through a function-level import, a relative import and a
    TYPE_CHECKING import is reported; without its last edge there is none."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\nfrom .. import a as unused\n"
                                          "from typing import TYPE_CHECKING\n")
    (package / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from pkg.a import f\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c", "pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) <= {"pkg.a", "pkg.sub.b",
                                                                          "pkg.sub.c"}
    (package / "sub" / "c.py").write_text("import json\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None


if __name__ == "__main__":
    for name, targets in sorted(import_graph(REPO_ROOT).items()):
        print(name, "->", ", ".join(sorted(targets)) or "-")
    found = find_cycle(import_graph(REPO_ROOT))
    print("cycle:", " -> ".join(found) if found else "none")
    sys.exit(1 if found else 0)

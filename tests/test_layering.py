"""The rooms and the arrows between them, read from the source (no imports run):

- only ``fa3trt/_trt.py`` imports TensorRT at run time (elsewhere only under ``TYPE_CHECKING``,
  for mypy against the stubs), and only ``fa3trt/_trt.py``, ``fa3trt/plugin/``, ``build.py``,
  ``compat.py``, ``runtime.py``, ``named_runtime.py``, ``backends.py`` and ``selfcheck.py`` reach it (other packages ask
  ``fa3trt.tensorrt_available()``); the op, the kernels and the model never do;
- no module imports another module's private name, and nothing outside ``fa3trt`` imports a
  private module of it;
- ``build_jobs`` and ``deploy`` never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fa3trt", "deploy", "build_jobs", "bench")
# fa3trt/__init__.py re-exports _trt.available as fa3trt.tensorrt_available for the other packages.
TRT_USERS = {
    "fa3trt/__init__.py",
    "fa3trt/serving/backends.py",
    "fa3trt/serving/served.py",
    "fa3trt/selfcheck.py",
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import with whether it sits under ``if TYPE_CHECKING:`` (static only)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, static: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for n in child.body:
                    visit_one(n, True)
                for n in child.orelse:
                    visit_one(n, static)
            else:
                visit_one(child, static)

    def visit_one(node: ast.AST, static: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, static))
        visit(node, static)

    visit(tree, False)
    return found


def _names(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """(module, imported name or None) pairs."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    return [(node.module or "", a.name) for a in node.names]


def _is_module(module: str, name: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return (base / f"{name}.py").exists() or (base / name / "__init__.py").exists()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_respects_the_rooms(path: Path) -> None:
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), rel)
    problems = []
    for node, static in _imports(tree):
        for module, name in _names(node):
            top = module.split(".")[0]
            full = f"{module}.{name}" if name else module
            if top == "tensorrt" and not static and rel != "fa3trt/trt/_trt.py":
                problems.append(f"imports TensorRT at run time ({full}); go through fa3trt.trt._trt")
            if "_trt" in full.split(".") and not (rel in TRT_USERS or rel.startswith("fa3trt/trt/")):
                problems.append(f"reaches TensorRT ({full}) outside the TensorRT layer")
            ours = top in PACKAGES
            if ours and name and name.startswith("_") and not _is_module(module, name):
                problems.append(f"imports the private name {name} from {module}")
            parts = full.split(".")
            private_module = top == "fa3trt" and any(p.startswith("_") and p != "__init__" for p in parts[1:])
            if private_module and not rel.startswith("fa3trt/"):
                problems.append(f"imports the private module {full} of fa3trt")
            if rel.startswith("build_jobs/") and top == "deploy":
                problems.append(f"build_jobs imports deploy ({full})")
            if rel.startswith("deploy/") and top == "build_jobs":
                problems.append(f"deploy imports build_jobs ({full})")
    assert not problems, "\n".join(problems)

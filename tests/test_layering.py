"""The rooms and the arrows between them, read from the source (no imports run):

- only ``fa3trt/trt/_trt.py`` imports TensorRT at run time (elsewhere only under
  ``TYPE_CHECKING``, for mypy against the stubs), and only the TensorRT layer (``fa3trt/trt/``)
  reaches that module; everything else asks ``fa3trt.trt.available()`` (``fa3trt.tensorrt_available``);
- the pipeline's rooms point one way (``ARROWS``): the op, the kernels and the routing know no
  model, exporter, engine or server; the exporter knows no model or engine; the TensorRT layer
  knows no model, exporter or store (what to build and where to keep it is ``fa3trt.artifacts``');
  the models know no engine or server; the generation loop knows no engine, exporter or store (its
  backend is handed to it);
- no module imports another module's private name, and nothing outside ``fa3trt`` imports a
  private module of it;
- ``build_jobs`` and ``deploy`` never import each other;
- no module of the library holds more than ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fa3trt", "deploy", "build_jobs", "bench")
# fa3trt/__init__.py re-exports _trt.available as fa3trt.tensorrt_available for the other packages.
MAX_LINES = 400

# Where each room of fa3trt may not reach (module prefixes). Static imports (TYPE_CHECKING) count too.
ARROWS: dict[str, tuple[str, ...]] = {
    "fa3trt/attention/": (
        "fa3trt.models",
        "fa3trt.onnx",
        "fa3trt.trt",
        "fa3trt.serving",
        "fa3trt.artifacts",
        "fa3trt.store",
        "fa3trt.config",
    ),
    "fa3trt/onnx/": (
        "fa3trt.models",
        "fa3trt.trt",
        "fa3trt.serving",
        "fa3trt.artifacts",
        "fa3trt.store",
        "fa3trt.config",
    ),
    "fa3trt/trt/": (
        "fa3trt.models",
        "fa3trt.onnx.export",
        "fa3trt.onnx.check",
        "fa3trt.onnx.calls",
        "fa3trt.serving",
        "fa3trt.artifacts",
        "fa3trt.store",
        "fa3trt.config",
    ),
    "fa3trt/models/": ("fa3trt.trt", "fa3trt.serving", "fa3trt.artifacts", "fa3trt.store", "fa3trt.config"),
    "fa3trt/serving/": ("fa3trt.config", "fa3trt.generation"),
    "fa3trt/generation/": (
        "fa3trt.trt",
        "fa3trt.onnx",
        "fa3trt.serving",
        "fa3trt.artifacts",
        "fa3trt.store",
        "fa3trt.config",
    ),
    "fa3trt/artifacts.py": ("fa3trt.serving", "fa3trt.config"),
    "fa3trt/config.py": ("fa3trt.serving", "fa3trt.trt", "fa3trt.artifacts", "fa3trt.onnx"),
    "fa3trt/store.py": ("fa3trt.models", "fa3trt.trt", "fa3trt.serving", "fa3trt.onnx", "fa3trt.attention"),
}
# The contract every room shares: these import no room of the pipeline.
for _base in ("errors", "defaults", "_hashing", "buckets", "signature", "requests", "transfer"):
    ARROWS[f"fa3trt/{_base}.py"] = tuple(
        f"fa3trt.{r}"
        for r in ("attention", "models", "onnx", "trt", "serving", "artifacts", "store", "config", "generation")
    )


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
            if "_trt" in full.split(".") and not rel.startswith("fa3trt/trt/"):
                problems.append(f"reaches TensorRT ({full}) outside the TensorRT layer; ask fa3trt.trt.available()")
            for room, banned in ARROWS.items():
                if rel.startswith(room) and any(full == b or full.startswith(b + ".") for b in banned):
                    problems.append(f"{room} imports {full}: an arrow the wrong way (tests/test_layering.py, ARROWS)")
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


@pytest.mark.parametrize(
    "path", [p for p in _modules() if p.parts[-2] != "bench"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_is_a_room_of_its_own(path: Path) -> None:
    """A module that outgrows MAX_LINES holds two things: split it by what each part holds."""
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"

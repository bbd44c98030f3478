"""The layout's rules that code review would otherwise have to remember: the library does not import the stages,
its imports make no circle, and the stage names are written once (pipeline/stage_names.py)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


def import_graph(root: Path, base: Path = REPO) -> dict[str, set[str]]:
    """module -> the modules under ``root`` it imports, anywhere in its file (a function's import counts too):
    ``import a.b``, ``from a import b`` (``a.b`` when b is a submodule, else ``a``), relative imports resolved.
    Importing a submodule runs its package's ``__init__`` too, but that is not counted: a package always owns its
    modules, and the arrow that matters is the one the code names."""
    modules = _module_names(root, base)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        deps.add(f"{target}.{alias.name}")
                    elif target in modules:
                        deps.add(target)
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
    """The walk resolves relative imports and ``from pkg import submodule`` and reports a circle it closes."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import reg\n")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..sub import reg\n")
    (pkg / "sub" / "reg.py").write_text("from pkg.sub import a\nimport os\n")
    (pkg / "free.py").write_text("from pkg import sub\n")
    graph = import_graph(pkg, tmp_path)
    assert graph["pkg.sub.a"] == {"pkg.sub.reg"} and graph["pkg.sub.reg"] == {"pkg.sub.a"}
    assert graph["pkg.sub"] == {"pkg.sub.a"} and graph["pkg.free"] == {"pkg.sub"}
    assert import_cycles(graph) == [["pkg.sub.a", "pkg.sub.reg", "pkg.sub.a"]]
    (pkg / "sub" / "reg.py").write_text("import os\n")
    assert import_cycles(import_graph(pkg, tmp_path)) == []


def test_no_import_circle_under_pipeline():
    graph = import_graph(REPO / "pipeline")
    assert len(graph) > 50 and graph["pipeline.refine"] >= {"pipeline.refine._registry", "pipeline.refine.sam"}
    cycles = import_cycles(graph)
    assert not cycles, "import circles under pipeline/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_stage_names_are_written_once():
    from pipeline.distributed import TRAINING_STAGES
    from pipeline.report.build import STAGE_ORDER
    from pipeline.stage_names import STAGE_NAMES, SUB_STAGES, done_markers
    from stages import STAGES
    from stages.evaluate import UPSTREAM

    assert tuple(STAGES) == STAGE_NAMES
    assert set(TRAINING_STAGES) <= set(STAGE_NAMES) and set(SUB_STAGES) <= set(STAGE_NAMES)
    assert all(subs[0] == stage for stage, subs in SUB_STAGES.items())  # a stage's own marker comes first
    markers = done_markers()
    assert markers == STAGE_ORDER and markers[-2:] == ("evaluate", "report")
    assert markers[:markers.index("evaluate")] == UPSTREAM
    assert "train_segmenter_gt" in UPSTREAM  # the GT twin's marker (stages/train_segmenter.py writes it)


def test_make_passes_each_stage_to_the_cli_without_listing_them():
    from pipeline.stage_names import STAGE_NAMES

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

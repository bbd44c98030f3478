"""The layout's rules that code review would otherwise have to remember: the library does not import the stages,
and the stage names are written once (pipeline/stage_names.py)."""

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

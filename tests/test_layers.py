"""The package's rooms import only downward and in no cycle; loading a model needs no engine.

Each module's xvol imports (top-level and lazy ones alike, read from its source) must point to
a room listed below its own in LAYERS. A new room goes into LAYERS where it belongs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom first; a room may import only the rooms before it (and itself)
LAYERS = [
    "xvol.checks",  # the option-check vocabulary: imports nothing from xvol
    "xvol.extras",
    "xvol.ops",
    "xvol.reparam",
    "xvol.data",
    "xvol.models",
    "xvol",  # the package root registers the models
    "xvol.formats",
    "xvol.results",
    "xvol.engine",
    "xvol.config",
    "xvol.cli",
]


def _room(module: str) -> str:
    parts = module.split(".")
    candidate = ".".join(parts[:2])
    return candidate if candidate in LAYERS else "xvol"


def _imports() -> dict[str, set[tuple[str, str]]]:
    """room -> {(importing module, imported xvol module)}."""
    out: dict[str, set[tuple[str, str]]] = {}
    for path in sorted((ROOT / "xvol").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name == "xvol" or name.startswith("xvol."):
                    out.setdefault(_room(module), set()).add((module, name))
    return out


def test_every_module_is_in_a_room() -> None:
    rooms = {_room(".".join(p.relative_to(ROOT).with_suffix("").parts))
             for p in (ROOT / "xvol").rglob("*.py")}  # fmt: skip
    assert rooms <= set(LAYERS)


def test_imports_point_down() -> None:
    upward = []
    for room, edges in _imports().items():
        level = LAYERS.index(room)
        for module, name in sorted(edges):
            target = _room(name)
            if LAYERS.index(target) > level:
                upward.append(f"{module} imports {name} ({room} -> {target})")
    assert upward == []


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_loading_a_model_imports_no_engine_and_no_cli() -> None:
    """xvol.formats.load (what xvol-eval, -reparam and -export load through) stands on the
    formats, the model spec and reparam alone."""
    code = (
        "import sys, xvol.formats.load, xvol.data.val\n"
        "print(sorted(m for m in sys.modules if m.startswith(('xvol.engine', 'xvol.cli', "
        "'xvol.config', 'hydra'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""Every training command in README.md composes: the README cannot drift from configs/.

Commands are taken from the README's fenced code blocks (continuation lines joined), the
launcher prefix (python / torchrun and its flags) is dropped, `--multirun` sweeps are expanded,
and each resulting override list is composed with Hydra's compose API, as scripts/train.py
would. Running them is the e2e tests' and `make demo`'s job; this checks every one is valid.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import xvol.config  # noqa: F401  (resolvers)

ROOT = Path(__file__).resolve().parent.parent
FLAGS = {"--multirun", "-m", "--cfg", "--help"}


def _commands() -> list[str]:
    blocks, current = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):  # a fence opens or closes a block
            if current is not None:
                blocks.append("\n".join(current))
            current = [] if current is None else None
            continue
        if current is not None:
            current.append(line)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if "scripts/train.py" in line and not line.startswith("#"):
                commands.append(line)
    return commands


def _overrides(command: str) -> list[list[str]]:
    """The override lists one command composes (several for a sweep)."""
    tokens = shlex.split(command.replace("...", "x"))
    args = tokens[tokens.index("scripts/train.py") + 1 :]
    if "--cfg" in args:  # `--cfg hydra` etc.: the value is not an override
        del args[args.index("--cfg") : args.index("--cfg") + 2]
    args = [a for a in args if a not in FLAGS]
    choices = []
    for arg in args:
        key, _, value = arg.partition("=")
        swept = "," in value and not value.startswith("[")
        choices.append([f"{key}={v}" for v in value.split(",")] if swept else [arg])
    return [list(c) for c in itertools.product(*choices)]


COMMANDS = _commands()


def test_readme_has_the_launch_recipes() -> None:
    text = "\n".join(COMMANDS)
    assert len(COMMANDS) >= 8
    for needle in ("torchrun --standalone", "--nnodes", "hydra/launcher=slurm", "--multirun"):
        assert needle in text, f"README lacks a {needle} recipe"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XVOL_DATA", "/nonexistent-data")  # composing must not touch data
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for overrides in _overrides(command):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            assert cfg.model.arch and cfg.data.name and cfg.trainer.epochs > 0, overrides


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run() -> None:
    """The README's Python examples run as written (and their asserts hold)."""
    blocks = _python_blocks()
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Repository layout", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_matches_the_tree() -> None:
    """Every path the layout names exists, and every package and module of xvol/ is named."""
    block = _layout_block()
    named = set(re.findall(r"(?m)^([\w./-]+/?)\s", block))
    for path in named:
        assert (ROOT / path).exists(), f"README layout names {path}, which is not in the tree"
    listed = " ".join(named)
    for child in sorted((ROOT / "xvol").iterdir()):
        if child.name.startswith(("_", ".")) or child.suffix not in {".py", ""}:
            continue
        rel = f"xvol/{child.name}" + ("/" if child.is_dir() else "")
        assert rel in listed or rel in block, f"README layout does not mention {rel}"
    for folder in ("scripts", "tools"):
        for f in sorted((ROOT / folder).iterdir()):
            assert f.name in block, f"README layout does not mention {folder}/{f.name}"

"""README.md and every docs/*.md page cannot drift from the tree, the configs or each other.

For each page:

- every `scripts/train.py` command (fenced blocks, continuation lines joined, and inline code
  spans; each line of a block of bare overrides counts as one) composes with Hydra's compose
  API, as scripts/train.py would: the launcher prefix (python / torchrun and its flags) is
  dropped and `--multirun` sweeps are expanded. Running them is the e2e tests' and
  `make demo`'s job; this checks every one is valid;
- every ```python block runs as written (and its asserts hold);
- every relative link `[text](path)` / `[text](path#anchor)` / `[text](#anchor)` leads to a file
  that exists and, for an anchor into a .md page, to one of its headings (GitHub's slugs);
- every repo path in backticks (`xvol/...`, `scripts/...`, `tools/...`, `configs/...`,
  `tests/...`, `docs/...`) exists;
- every config group choice in a code span or block (`model=NAME`, `data=a,b`,
  `hydra/launcher=slurm`, ...) names a file of configs/<group>/.

README.md also keeps its launch recipes, stays under 300 lines, and its "Repository layout"
block names every xvol module, every scripts/ and tools/ file and docs/, and only paths that
exist. The checkers take a page's path or text, and a broken page proves they can fail.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import unicodedata
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import xvol.config  # noqa: F401  (resolvers)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FLAGS = {"--multirun", "-m", "--cfg", "--help"}
REPO_DIRS = ("xvol/", "scripts/", "tools/", "configs/", "tests/", "docs/")
GROUPS = sorted(
    str(d.relative_to(ROOT / "configs")) for d in (ROOT / "configs").rglob("*") if d.is_dir()
)
BUILTIN_CHOICES = {"hydra/launcher": {"basic"}}  # Hydra's own, not a file of configs/
OVERRIDES = re.compile(r"(?:[\w./-]+=\S+\s*)+")  # a line of overrides only, `a.b=1 c=x`
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", flags=re.S | re.M)


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


# --- what a page holds ---------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The page without its fenced blocks (where links, headings and code spans live)."""
    return FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks, a span broken over lines joined by a space."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose(text))]


def train_commands(text: str) -> list[str]:
    """Every scripts/train.py command of a page: fenced lines, then inline spans."""
    commands = []
    for _, block in fenced_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        if lines and all(OVERRIDES.fullmatch(line) for line in lines):  # a block of overrides
            commands += [f"python scripts/train.py {line}" for line in lines]
            continue
        commands += [line for line in lines if "scripts/train.py" in line]
    commands += [span for span in code_spans(text) if "scripts/train.py" in span]
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


def compose_error(command: str) -> str | None:
    """Why `command` does not compose (None: every override list of it composes)."""
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            for overrides in _overrides(command):
                cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
                if not (cfg.model.arch and cfg.data.name and cfg.trainer.epochs > 0):
                    return f"{overrides}: no model, data or epochs"
    except Exception as e:  # any failure to compose is the finding
        return f"{type(e).__name__}: {e}"
    return None


def command_errors(page: Path) -> list[str]:
    errors = []
    for command in train_commands(page.read_text()):
        error = compose_error(command)
        if error is not None:
            errors.append(f"{_rel(page)}: `{command}` does not compose: {error}")
    return errors


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, repeats numbered as GitHub does (name, name-1, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*$", prose(page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_errors(page: Path) -> list[str]:
    """Relative links of a page to a missing file, or to a heading its .md target lacks."""
    errors = []
    text = re.sub(r"`[^`]*`", "", prose(page.read_text()))  # code is not markup
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            errors.append(f"{_rel(page)}: link ({target}) leads to a missing file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"{_rel(page)}: link ({target}): {dest.name} has no such heading")
    return errors


def path_errors(text: str, source: str = "page") -> list[str]:
    """Repo paths in code spans (`xvol/...`, `configs/...`, ...) that are not in the tree."""
    errors = []
    for span in code_spans(text):
        for token in span.split():
            token = token.strip("\"'(),:;.")
            if not token.startswith(REPO_DIRS) or re.search(r"[*<>{}$\[\]]|\.\.", token):
                continue  # placeholders (configs/model/<name>.yaml, scripts/*.py) name no file
            if not (ROOT / token).exists():
                errors.append(f"{source}: `{token}` is not in the tree")
    return errors


def group_choice_errors(text: str, source: str = "page") -> list[str]:
    """`group=choice` in code (spans and blocks) naming no file of configs/<group>/."""
    code = "\n".join([*code_spans(text), *(body for _, body in fenced_blocks(text))])
    errors = []
    for group, values in re.findall(r"(?<![\w./+-])([a-z_]+(?:/[a-z_]+)?)=([\w.,-]+)", code):
        if group not in GROUPS:
            continue  # model.stages=..., a make variable, a flag: not a group choice
        for value in values.split(","):
            if value in BUILTIN_CHOICES.get(group, ()) or not value or value.isupper():
                continue  # Hydra's own choices, placeholders such as NAME
            if not (ROOT / "configs" / group / f"{value}.yaml").exists():
                errors.append(f"{source}: {group}={value}: no configs/{group}/{value}.yaml")
    return errors


def python_blocks(text: str) -> list[str]:
    return [body for info, body in fenced_blocks(text) if info == "python"]


def run_python(block: str, source: str) -> None:
    exec(compile(block, source, "exec"), {"__name__": "docs_example"})


# --- the pages -----------------------------------------------------------------------------

COMMANDS = [(page, i, c) for page in PAGES for i, c in enumerate(train_commands(page.read_text()))]
EXAMPLES = [(page, i, b) for page in PAGES for i, b in enumerate(python_blocks(page.read_text()))]


def test_the_docs_pages_exist() -> None:
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    for name in (
        "README.md",
        "operator.md",
        "models.md",
        "data.md",
        "training.md",
        "tools.md",
        "formats.md",
        "performance.md",
        "troubleshooting.md",
    ):
        assert name in names, f"docs/{name} is missing"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines; move detail into docs/"


def test_readme_has_the_launch_recipes() -> None:
    commands = train_commands(README.read_text())
    assert len(commands) >= 6
    text = "\n".join(commands)
    for needle in ("torchrun --standalone", "--nnodes", "hydra/launcher=slurm", "--multirun"):
        assert needle in text, f"README lacks a {needle} recipe"


@pytest.mark.parametrize(
    ("page", "index", "command"), COMMANDS, ids=[f"{_rel(p)}:{i}" for p, i, _ in COMMANDS]
)
def test_train_command_composes(
    page: Path, index: int, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XVOL_DATA", "/nonexistent-data")  # composing must not touch data
    assert compose_error(command) is None, f"{_rel(page)}: {command}: {compose_error(command)}"


@pytest.mark.parametrize(
    ("page", "index", "block"), EXAMPLES, ids=[f"{_rel(p)}:{i}" for p, i, _ in EXAMPLES]
)
def test_python_example_runs(page: Path, index: int, block: str) -> None:
    """The pages' Python examples run as written (and their asserts hold)."""
    run_python(block, f"{_rel(page)} python block {index}")


def test_there_are_python_examples() -> None:
    assert {_rel(p) for p, _, _ in EXAMPLES} >= {"docs/operator.md", "docs/models.md"}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_lead_somewhere(page: Path) -> None:
    assert link_errors(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_repo_paths_exist(page: Path) -> None:
    assert path_errors(page.read_text(), _rel(page)) == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_config_group_choices_exist(page: Path) -> None:
    assert group_choice_errors(page.read_text(), _rel(page)) == []


def test_the_checkers_report_a_broken_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each checker finds what is wrong in a page written to be wrong (and passes a good one)."""
    monkeypatch.setenv("XVOL_DATA", "/nonexistent-data")
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n")
    page = tmp_path / "broken.md"
    page.write_text(
        "# Broken\n\n"
        "[gone](docs/nope.md) [bad anchor](other.md#no-such-heading) [here](#nowhere)\n"
        "[fine](other.md#a-heading) [also fine](#broken) [web](https://example.com/x.md)\n\n"
        "See `xvol/nope.py` and `configs/model/xresnet50.yaml`.\n\n"
        "```bash\npython scripts/train.py model=nope\n"
        "python scripts/train.py model=xresnet18 trainer.epoks=2\n"
        "python scripts/train.py model=xresnet18 data=demo\n```\n\n"
        "```python\nassert 1 + 1 == 3\n```\n"
    )
    links = link_errors(page)
    assert len(links) == 3, links
    assert any("docs/nope.md" in e and "missing file" in e for e in links)
    assert any("other.md#no-such-heading" in e for e in links)
    assert any("#nowhere" in e for e in links)
    broken = command_errors(page)
    assert len(broken) == 2, broken
    assert "model=nope" in broken[0] and "trainer.epoks" in broken[1]
    assert path_errors(page.read_text()) == ["page: `xvol/nope.py` is not in the tree"]
    assert group_choice_errors(page.read_text()) == ["page: model=nope: no configs/model/nope.yaml"]
    (block,) = python_blocks(page.read_text())
    with pytest.raises(AssertionError):
        run_python(block, "broken.md")


def test_slugs_follow_github() -> None:
    assert slug("Where it goes in a ResNet") == "where-it-goes-in-a-resnet"
    assert slug("Does X-volution help?") == "does-x-volution-help"
    assert slug("X-volution in any CNN: `xvol.convert`") == "x-volution-in-any-cnn-xvolconvert"
    assert slug("Checkpoints, resuming and preemption") == "checkpoints-resuming-and-preemption"
    assert slug("The stem: `model.stem`") == "the-stem-modelstem"


# --- the layout block ----------------------------------------------------------------------


def _layout_block() -> str:
    section = README.read_text().split("\n## Repository layout\n", 1)[1]
    return section.split("```", 2)[1]


def _layout_entries() -> dict[str, str]:
    """{path named at the start of a line: its text, continuation lines included}."""
    entries: dict[str, str] = {}
    current = None
    for line in _layout_block().splitlines():
        m = re.match(r"([\w./-]+/?)\s", line + " ")
        if m and not line.startswith(" "):
            current = m.group(1)
            entries[current] = line[len(current) :]
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def _tracked(folder: str) -> list[str]:
    """Files git tracks in ROOT/folder (the tree's own, not a scratch file beside them)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a checkout: what is there
        out = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file()]
    return sorted(out)


def _names(text: str, name: str) -> bool:
    """``name`` appears in ``text`` as a whole file name (not inside a longer one)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) is not None


def test_readme_layout_matches_the_tree() -> None:
    """Every path the layout names exists; every xvol module, scripts/ and tools/ file is named."""
    entries = _layout_entries()
    for path, text in entries.items():
        assert (ROOT / path).exists(), f"README layout names {path}, which is not in the tree"
        if not path.endswith("/"):
            continue
        for name in re.findall(r"(?<![\w/.])([\w.-]+\.(?:py|sh|yaml|md))\b", text):
            assert (ROOT / path / name).exists(), f"README layout names {path}{name}: missing"
    listed = " ".join(entries)
    for child in sorted((ROOT / "xvol").iterdir()):
        if child.name.startswith(("_", ".")) or child.suffix not in {".py", ""}:
            continue
        rel = f"xvol/{child.name}" + ("/" if child.is_dir() else "")
        assert rel in listed, f"README layout does not mention {rel}"
        if child.is_dir():  # a package: each of its modules in its entry
            for module in sorted(child.glob("*.py")):
                if module.name != "__init__.py":
                    assert _names(entries[rel], module.name), f"README layout lacks {module}"
    for folder in ("scripts", "tools"):
        for f in _tracked(folder):
            name = Path(f).name
            assert _names(entries[f"{folder}/"], name), f"README layout does not mention {f}"
    assert "docs/" in entries, "README layout does not mention docs/"

"""Every command the documentation shows parses and validates, and every link in it leads somewhere.

Each ``python cli.py ...`` (also ``continual-ft ...``, ``torchrun ... cli.py ...``, ``accelerate launch ...
cli.py ...``) in README.md and docs/**/*.md, in a code block or an inline code span, is parsed by the click
command it names and checked as that command checks before it trains or writes anything: ``run`` builds its
config (``make_config``), checks it (``check_config``) and loads and checks the scenario (``load_scenario``,
``check_scenario``); ``compare`` does so for every point of its grid (``grid_configs``); ``tune`` plans its
study (``tune.plan``: every search spec, both ends of every range, the scenario). ``resume``, ``plot``,
``list`` and a ``compare`` of run directories need a run folder and are parsed only. No model is loaded and
nothing is trained or written.

A ``$ `` line in a text block followed by ``error: ...`` is an error example: the command must fail with
exactly that line. What a command cannot be checked for is said once, in the tables below, with the reason.
"""

from __future__ import annotations

import functools
import importlib.machinery
import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from continual_ft.cli import cli
from continual_ft.config import make_config
from continual_ft.data.scenario import load_scenario
from continual_ft.errors import ContinualFTError
from continual_ft.run.checks import check_config, check_scenario
from continual_ft.strategies import strategy_names
from continual_ft.study.compare import grid_configs

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: Example values for the placeholders the docs write in angle brackets: a command that holds one is
#: checked with this value in its place.
PLACEHOLDERS = {
    "<s>": "1",  # a seed (0, 1, 2), or in `name=three_domains-<s>-continue-seed1` a strategy's name
    "<L>": "10000",  # avalanche:ewc.ewc_lambda, 10⁴ and 10⁶
}

#: Scenario files that stand for the reader's own (none is shipped): the command's config is checked,
#: its scenario is not loaded.
READERS_SCENARIOS = {"my_scenario.yaml", "support.yaml", "toy.yaml"}

#: Error examples whose error comes from training, not from the checks before it; the command itself
#: must validate. Reason, by the command's text.
TRAINING_ERRORS = {
    "python cli.py run model=tiny scenario=toy.yaml train.lr=1e30 train.warmup_steps=0 name=nan": (
        "a NaN loss stops a stage in training; tests/test_resume.py checks that line "
        "(test_nan_loss_stops_with_one_line_and_the_run_resumes_with_a_lower_lr)"
    ),
}

#: Commands written with ``...`` (or ``…``) for the settings left out are not checked.
ELIDED = ("...", "…")

COMMAND_START = re.compile(  # the program, then a subcommand (a bare `continual-ft` is a name, not a command)
    r"(?:(?:\.venv[\w-]*/bin/)?python3?\s+cli\.py|continual-ft|cli\.py"
    r"|torchrun\s[^|;]*?\bcli\.py|accelerate\s+launch\s[^|;]*?\bcli\.py)(?=\s+[\w.-])"
)
FOR_LOOP = re.compile(r"^for (\w+) in ([^;]+); do (.+?);? done$")
ASSIGNMENT = re.compile(r'^(\w+)="([^"]*)"\s*(?:#.*)?$')
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclass
class DocCommand:
    """One command as the docs write it, with where it stands and what it should do."""

    file: str
    line: int
    text: str
    error: str | None = None  # the documented `error: ...` line, for an error example
    hidden: tuple[str, ...] = ()  # packages the example says are not installed

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _expand_variables(text: str, variables: dict[str, str]) -> str:
    """``$S`` as the text defined it above (``S="..."`` in a code block); one it never defined stays."""
    return VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def _logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Shell lines with their continuations (a trailing backslash) joined, numbered from ``first``."""
    out, buf, start = [], "", first
    for i, line in enumerate(lines, first):
        if not buf:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _commands_in_shell(text: str, variables: dict[str, str]) -> list[str]:
    """The cli commands of one shell line: a ``for`` loop gives one per value, a variable its value."""
    text = text.strip()
    loop = FOR_LOOP.match(text)
    if loop:
        name, values, body = loop.groups()
        found = []
        for value in values.split():
            found += _commands_in_shell(body, {**variables, name: value})
        return found
    m = COMMAND_START.search(text)
    if not m:
        return []
    command = text[m.start() :]
    if m.start() and text[m.start() - 1] not in " \t$#=;(":
        return []
    return [_expand_variables(command, variables)] if "$" in command else [command]


def extract(path: Path, root: Path = ROOT) -> list[DocCommand]:
    """Every cli command in a markdown file: in code blocks (a ``$ `` line of a text block is a command, the
    lines after it up to the next one its output) and in inline code spans."""
    rel = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[DocCommand] = []
    variables: dict[str, str] = {}  # S="..." in a block holds for the rest of the file
    defined: list[tuple[int, dict[str, str]]] = [(0, {})]  # the variables as they stand from each line on
    prose: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        lang, start = fence.group(2), i + 2
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence.group(1)):
            j += 1
        block = lines[i + 1 : j]
        i = j + 1
        if lang in ("", "text", "console") and any(b.startswith("$ ") for b in block):
            for k, line in enumerate(block):
                if not line.startswith("$ "):
                    continue
                output = []
                for after in block[k + 1 :]:
                    if after.startswith("$ "):
                        break
                    output.append(after)
                error = next((o[len("error: ") :] for o in output if o.startswith("error: ")), None)
                shell = line[2:]
                hidden = tuple(re.findall(r"#\s*(\w+) not installed", shell))
                for text in _commands_in_shell(shell, variables):
                    found.append(DocCommand(rel, start + k, text, error, hidden))
            continue
        for number, line in _logical_lines(block, start):
            assignment = ASSIGNMENT.match(line.strip())
            if assignment:
                variables[assignment.group(1)] = _expand_variables(assignment.group(2), variables)
                defined.append((number, dict(variables)))
                continue
            found += [DocCommand(rel, number, text) for text in _commands_in_shell(line, variables)]
    text = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(m.group(1).split())
        if COMMAND_START.match(span):
            line = numbers[text.count("\n", 0, m.start())]
            before = [v for n, v in defined if n < line][-1]  # `$S` as the text above the span defined it
            found += [DocCommand(rel, line, c) for c in _commands_in_shell(span, before)]
    return found


def all_commands() -> list[DocCommand]:
    return [c for path in DOC_FILES for c in extract(path)]


# --- checking one command ------------------------------------------------------------------------------


def _argv(command: DocCommand) -> list[str]:
    """The arguments after ``cli.py`` / ``continual-ft``, placeholders filled in."""
    text = command.text
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    if re.search(r"<[\w ]+>", text):
        raise AssertionError(f"{command}: a placeholder not in PLACEHOLDERS; give it an example value there")
    words = shlex.split(text, comments=True)
    at = next(i for i, w in enumerate(words) if w == "continual-ft" or w.endswith("cli.py"))
    return words[at + 1 :]


def _alternatives(argv: list[str]) -> list[list[str]]:
    """``strategy=naive|replay`` stands for two commands."""
    out = [[]]
    for word in argv:
        options = word.split("=", 1)[1].split("|") if "=" in word and "|" in word else None
        if options is None:
            out = [a + [word] for a in out]
        else:
            key = word.split("=", 1)[0]
            out = [a + [f"{key}={o}"] for a in out for o in options]
    return out


@functools.cache
def _scenario(name: str, quick: bool, seed: int, sizes: tuple):
    return load_scenario(name, quick=quick, seed=seed, sizes=dict(sizes))


def check_run_config(config) -> str:
    """What ``run`` checks before it makes a run folder: the config, the strategies, the scenario."""
    check_config(config)
    if Path(config.scenario).name in READERS_SCENARIOS and not Path(config.scenario).exists():
        return "config checked (the reader's own scenario file)"
    scenario = _scenario(config.scenario, config.quick, config.seed, tuple(sorted(config.data.sizes().items())))
    check_scenario(config, scenario)
    return "validated"


def check_argv(argv: list[str]) -> str:
    """Parse ``argv`` as the CLI does and check it as its command does before any work; say how far it got.

    Raises ``ContinualFTError`` or ``click.ClickException`` where the command would stop with an error line.
    """
    name, command, rest = cli.resolve_command(click.Context(cli, info_name="cli"), list(argv))
    params = command.make_context(name, list(rest)).params
    if name == "run":
        return check_run_config(make_config(list(params["overrides"]), strategy_names()))
    if name == "compare":
        args = list(params["args"])
        overrides = [a for a in args if "=" in a or a == "quick"]
        if not overrides:
            return "parsed (run directories)"
        if len(overrides) < len(args):
            raise ContinualFTError("give either key=value settings (a grid to run) or run directories, not both")
        return [check_run_config(config) for config, _ in grid_configs(overrides, strategy_names())][0]
    if name == "tune":
        from continual_ft.study.tune import plan

        plan(list(params["args"]))
        return "validated"
    if name == "resume" and params["extra"]:  # the CLI's own first check, before it reads the run folder
        raise ContinualFTError(f"resume takes no settings ({params['extra'][0]!r})")
    return "parsed (needs a run folder)" if name in ("resume", "plot") else "parsed"


def error_line(argv: list[str]) -> str | None:
    """The ``error: ...`` text the CLI would print for ``argv`` before any work, or None if it validates."""
    try:
        check_argv(argv)
    except ContinualFTError as e:
        return str(e)
    except click.ClickException as e:
        return e.format_message()
    return None


@pytest.fixture
def avalanche_stand_in(monkeypatch):
    """Where avalanche-lib is not installed (``.venv``), an empty module stands in for it, so the
    ``avalanche:*`` commands are checked like the others (their settings, what Avalanche's loop refuses)."""
    try:
        import avalanche  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("avalanche")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("avalanche", None)
        monkeypatch.setitem(sys.modules, "avalanche", stand_in)


DOC_COMMANDS = all_commands()


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=lambda c: f"{c.file}:{c.line}")
def test_every_documented_command_validates(command, avalanche_stand_in, monkeypatch):
    if any(e in command.text for e in ELIDED):
        pytest.skip("elided: the text leaves settings out with ...")
    assert "$" not in command.text, f"{command}: a shell variable the text does not define above it"
    for package in command.hidden:
        monkeypatch.setitem(sys.modules, package, None)  # `import wandb` raises ImportError
    expected = None if command.text in TRAINING_ERRORS else command.error
    for argv in _alternatives(_argv(command)):
        got = error_line(argv)
        if expected is None:
            assert got is None, f"{command}\n  fails: error: {got}"
        else:
            assert got == expected, f"{command}\n  documented: error: {expected}\n  the CLI says: error: {got}"


def test_the_docs_hold_commands_of_every_kind():
    """The extraction finds what the docs hold (if it found nothing, every check above would pass)."""
    names = [_argv(c)[0] for c in DOC_COMMANDS if not any(e in c.text for e in ELIDED)]
    for name in ("run", "compare", "tune", "resume", "list", "plot"):
        assert name in names, name
    assert len(DOC_COMMANDS) >= 80
    assert sum(c.error is not None for c in DOC_COMMANDS) >= 5
    assert set(TRAINING_ERRORS) <= {c.text for c in DOC_COMMANDS if c.error}, "an entry of TRAINING_ERRORS is gone"


def test_a_wrong_key_or_value_is_caught_by_the_same_checks(tmp_path, avalanche_stand_in):
    """The checker is able to fail: a typo in a key, a strategy, a scenario's size, a grid point, a search."""
    doc = tmp_path / "page.md"
    doc.write_text(
        "Run `python cli.py run stratgy=naive`.\n\n"
        "```bash\n"
        'S="scenario=medical_then_legal data.train_size=300"\n'
        "python cli.py run strategy=replay+ewc replay.buffer_sise=300 $S\n"
        "for s in naive replya; do python cli.py run strategy=$s; done\n"
        "python cli.py run scenario=legal_then_medical data.train_size=100000\n"
        "python cli.py compare strategy=naive,ewc adapter=stack\n"
        "python cli.py tune search.train.lr=log:0:1e-3\n"
        "python cli.py resume runs/x --sett train.lr=1e-4\n"
        "python cli.py run strategy=avalanche:ewc train.checkpoint_every=5\n"
        "python cli.py list --all\n"
        "```\n"
    )
    commands = extract(doc, tmp_path)
    assert [c.text for c in commands] == [
        "python cli.py run strategy=replay+ewc replay.buffer_sise=300 scenario=medical_then_legal data.train_size=300",
        "python cli.py run strategy=naive",
        "python cli.py run strategy=replya",
        "python cli.py run scenario=legal_then_medical data.train_size=100000",
        "python cli.py compare strategy=naive,ewc adapter=stack",
        "python cli.py tune search.train.lr=log:0:1e-3",
        "python cli.py resume runs/x --sett train.lr=1e-4",
        "python cli.py run strategy=avalanche:ewc train.checkpoint_every=5",
        "python cli.py list --all",
        "python cli.py run stratgy=naive",
    ]
    errors = [error_line(_argv(c)) for c in commands]
    assert errors[1] is None
    assert all(e for i, e in enumerate(errors) if i != 1), errors
    assert errors[-1].startswith("unknown config key 'stratgy'")
    assert "replya" in errors[2] and "buffer_sise" in errors[0]
    assert errors[4].startswith("strategy=ewc needs adapter=continue")
    assert errors[7].startswith("strategy=avalanche:ewc") and "train.checkpoint_every" in errors[7]
    assert "--all" in errors[8]


# --- links and paths -----------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*\]\(([^)\s]+)\)")
SOURCE_PATH = re.compile(
    r"(?<![\w./-])((?:continual_ft|strategies|tests|examples|bench|scripts|scenarios)/[\w/.-]*\w\.(?:py|sh|yaml))"
)
MODULE = re.compile(r"(?<![\w.])continual_ft(?:\.\w+)+")


def _prose(path: Path, code_spans: bool = False) -> str:
    """The file's text outside code blocks and, unless ``code_spans``, inline code (where a link is a link)."""
    text, inside = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line)
        if fence and (inside is None or line.strip().startswith(inside)):
            inside = None if inside else fence.group(1)
            continue
        if inside is None:
            text.append(line)
    return "\n".join(text) if code_spans else re.sub(r"`[^`]*`", "", "\n".join(text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*", "", heading.strip().lstrip("#").strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path, code_spans=True).splitlines():
        if re.match(r"#{1,6} ", line):
            base = slug(line)
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


LINKED_FILES = [*DOC_FILES, ROOT / "bench" / "README.md"]


def links(path: Path) -> list[tuple[Path, str]]:
    """Every relative link of a markdown file: (the file it leads to, the anchor or "")."""
    out = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        out.append(((path.parent / file).resolve() if file else path, anchor))
    return out


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_leads_somewhere(path):
    broken = []
    for target, anchor in links(path):
        if not target.exists():
            broken.append(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{target.relative_to(ROOT)}#{anchor}: no such heading")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page_and_every_page_is_reachable():
    """Each docs page is linked from the README, and every page under docs/ (the notebook's reports too)
    can be reached from it by following links."""
    top = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "docs" / "results" / "README.md"]
    from_readme = {t for t, _ in links(ROOT / "README.md")}
    assert [p.name for p in top if p not in from_readme] == []
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached or page.suffix != ".md" or not page.exists():
            continue
        reached.add(page)
        todo += [t for t, _ in links(page)]
    unreached = [str(p.relative_to(ROOT)) for p in DOC_FILES if p not in reached]
    assert unreached == []


def test_every_source_path_the_docs_name_exists():
    """`continual_ft/run/checks.py`, `tests/test_resume.py`, `examples/plain_loop.py`, ... as the docs write them."""
    missing = []
    for path in LINKED_FILES:
        for name in SOURCE_PATH.findall(path.read_text(encoding="utf-8")):
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []


def test_every_module_the_docs_name_imports():
    """`continual_ft.run.runner.run`, `continual_ft.integrations.hf_trainer.ContinualTrainer`, ...: the longest
    part that is a module imports and the rest are attributes of it."""
    import importlib

    wrong = []
    for path in LINKED_FILES:
        for name in sorted(set(MODULE.findall(path.read_text(encoding="utf-8")))):
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ModuleNotFoundError:
                    continue
            for attr in parts[cut:]:
                if not hasattr(obj, attr):
                    wrong.append(f"{path.relative_to(ROOT)}: {name}")
                    break
                obj = getattr(obj, attr)
    assert wrong == []


def test_the_readme_headline_is_the_notebooks_default_job():
    """The README's R and metrics of the default job are the lab notebook's, figure for figure."""

    def first_r_block(path: Path) -> str:
        text = path.read_text(encoding="utf-8")
        return re.search(r"```text\n(R\[accuracy\].*?)```", text, re.S).group(1)

    assert first_r_block(ROOT / "README.md") == first_r_block(ROOT / "docs" / "results" / "README.md")


@pytest.mark.parametrize("page", ["README.md", "docs/using-strategies.md"])
def test_the_strategy_tables_list_every_registered_strategy(page):
    """One row per strategy that ``strategy=`` takes (Avalanche's in one row of their own)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    table = re.search(r"\| name \| what it does \| settings \|\n\|[-|]+\|\n((?:\|.*\n)+)", text).group(1)
    rows = [re.match(r"\| `([\w:*]+)`", row).group(1) for row in table.splitlines()]
    ours = [n for n in strategy_names() if not n.startswith("avalanche:")]
    assert sorted(r for r in rows if not r.startswith("avalanche:")) == sorted(ours)
    assert any(r.startswith("avalanche:") for r in rows)

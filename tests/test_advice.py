"""Every command line kdbench prints as advice parses (issue 32): help examples, error hints, README command blocks.

The lines are collected, not listed: the help text of every command, every ``kdbench.advice.command`` and
``setting`` call in the source (the only way a message builds a command line), and the README's bash blocks.
A source string that spells a command itself (``python -m kdbench.X`` in a message) is refused.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex

import pytest
from conftest import REPO

from kdbench import advice
from kdbench.cli import COMMANDS
from kdbench.sweep.ablation import load_ablation

COMMAND = re.compile(r"(?:python -m kdbench\.(?:cli )?|\bkdbench )(sweep|train|report|profile)\b(.*)")
PLACEHOLDER = "0"  # a value computed at run time: parses as any number, word or folder


def parser_of(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    return module.build_parser() if hasattr(module, "build_parser") else None


def parse(name: str, argv: list[str]):
    """``argv`` parsed by command ``name``'s own parser, with a placeholder for a required argument it leaves out."""
    if name == "report":
        argv = argv or [PLACEHOLDER]
        assert len(argv) == 1, argv  # its one argument, the folder
        return argv
    if name == "profile":
        return importlib.import_module("kdbench.profile").parse_args(argv)
    parser = parser_of(name)
    for action in parser._actions:
        if action.required and not set(action.option_strings) & set(argv):
            argv = [*argv, action.option_strings[0], PLACEHOLDER]
    return parser.parse_args(argv)


def lines_in(text: str) -> list[tuple[str, str]]:
    """``(command, arguments)`` of each kdbench command line in a text (one per line; a ``#`` comment ends it)."""
    out = []
    for line in text.splitlines():
        match = COMMAND.search(line.split(" #")[0])
        if match:
            out.append((match.group(1), match.group(2).split("``")[0].strip()))  # ``...`` ends a line quoted in prose
    return out


def help_lines() -> list[tuple[str, str]]:
    texts = [importlib.import_module("kdbench.cli").build_parser().format_help()]
    texts += [parser_of(n).format_help() for n in ("sweep", "train")]
    return [(n, a) for text in texts for n, a in lines_in(text) if not a.startswith(("[", ":"))]  # not usage lines


def source_calls() -> list[str]:
    """Every ``command(...)``/``setting(...)`` call of kdbench.advice in the source, called with placeholders."""
    out = []
    for path in sorted((REPO / "kdbench").rglob("*.py")):
        if path.name == "advice.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("command", "setting"):
                args = [a.value if isinstance(a, ast.Constant) else PLACEHOLDER for a in node.args]
                out.append(getattr(advice, node.func.id)(*args))
    return out


def readme_lines() -> list[tuple[str, str]]:
    """The kdbench commands of README.md's bash blocks: continuations joined, ``VAR=...`` assignments expanded."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    out = []
    for block in blocks:
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            assignment = re.fullmatch(r"([A-Z_]+)=(.*)", line.strip())
            if assignment:
                variables[assignment.group(1)] = shlex.split(assignment.group(2))[0]
                continue
            for part in line.split("&&"):
                for name, value in variables.items():
                    part = part.replace(f'"${name}"', shlex.quote(value))
                out += lines_in(part)
    return out


def source_strings() -> list[str]:
    return [
        node.value
        for path in sorted((REPO / "kdbench").rglob("*.py"))
        if path.name != "advice.py"
        for call in ast.walk(ast.parse(path.read_text()))
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") in ("UserError", "print")
        for node in ast.walk(call)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_the_collections_find_lines():
    assert len(help_lines()) >= 8 and len(readme_lines()) >= 10 and len(source_calls()) >= 6


@pytest.mark.parametrize("name, args", help_lines() + readme_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_help_example_and_readme_command_parses(name, args):
    parsed = parse(name, shlex.split(args))
    if name == "sweep":  # the ablation and its --set overrides, too (no dataset is looked for)
        load_ablation(parsed.config, parsed.overrides)
    if name == "train":
        importlib.import_module("kdbench.train").config_from_args(parsed)


def test_each_hint_in_the_source_parses():
    for text in source_calls():
        found = lines_in(text.replace("; ", "\n").replace(")", "\n"))
        assert found, text
        for name, args in found:
            parse(name, shlex.split(args))


def test_no_message_spells_a_command_itself():
    assert [s for s in source_strings() if COMMAND.search(s)] == []


def test_hints_are_spelled_as_the_user_typed_the_command(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/kdbench", "sweep"])
    assert advice.command("report", "out") == "kdbench report out"
    assert advice.setting("data.skip_bad_images", "true") == (
        "data.skip_bad_images = true (kdbench train --skip-bad-images; kdbench sweep --set data.skip_bad_images=true)"
    )
    assert parser_of("train").prog == "kdbench train" and "kdbench train --dataset" in parser_of("train").format_help()
    monkeypatch.setattr("sys.argv", ["/x/kdbench/sweep/__main__.py"])
    assert advice.command("report") == "python -m kdbench.report"

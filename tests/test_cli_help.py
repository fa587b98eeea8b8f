"""Every subcommand's --help documents every option: a sentence, and exactly one default note
(``(default: ...)``, ``(required)``), never ``None``. The parsers are walked from the CLI's own
argparse tree, so an option added later is checked without touching this test."""

from __future__ import annotations

import argparse
import re

import pytest

from miras_pretrain.cli import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return [(" ".join(path) or "(top)", p) for path, p in _walk(build_parser())]


def _problems(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    out = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            out.append(f"{name}: no help text")
            continue
        text = formatter._expand_help(action)
        sentence = re.split(r"\s*\((default|required|repeatable)", text)[0]
        if len(re.findall(r"[A-Za-z]{2,}", sentence)) < 2:
            out.append(f"{name}: help {text!r} is not a sentence")
        if not action.option_strings:  # positional: required by nature, no default
            continue
        notes = len(re.findall(r"\(default|\(required|; default", text))
        if notes != 1:
            out.append(f"{name}: {notes} default notes in {text!r} (want exactly one)")
        if re.search(r"default:? None\b", text):
            out.append(f"{name}: shows a None default: {text!r}")
    return out


def test_every_subcommand_is_walked():
    names = {name for name, _ in _parsers()}
    for expected in ("train", "eval", "export hf", "launch slurm", "tokenizer train", "tokenizer inspect",
                     "data prepare", "models", "demo"):
        assert expected in names, sorted(names)


@pytest.mark.parametrize("name, parser", _parsers(), ids=[n for n, _ in _parsers()])
def test_help_documents_every_option(name, parser):
    assert _problems(parser) == [], name
    text = parser.format_help()  # renders (no % formatting errors) and lists every option
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            for opt in action.option_strings:
                assert opt in text, (name, opt)


def test_the_checker_catches_what_the_issue_reported():
    """The checker is not vacuous: an option without help, a doubled default and a None default fail."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="sentencepiece model (default: the run's)")
    p.add_argument("--model", help="exported directory")
    got = "\n".join(_problems(p))
    assert "--seed: no help text" in got
    assert "--tokenizer: 2 default notes" in got
    assert "--model: shows a None default" in got

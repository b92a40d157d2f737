"""The `ssmc` command: summaries, exit codes, no tracebacks, complete help."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ssmc.cli import build_parser, main

ROOT = Path(__file__).parent.parent
ERR = sorted((ROOT / "tests" / "specs" / "err").glob("*.ssm"))


def test_check_prints_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--no-proof", str(ROOT / "examples" / "mamba2.ssm")]) == 0
    out = capsys.readouterr().out
    assert "MVA" in out and "semiseparable" in out and "chunked" in out
    assert "[batch, H=80, N=128, P=64]" in out


@pytest.mark.parametrize("path", ERR[:12], ids=lambda p: p.stem)
def test_bad_spec_exits_2_without_traceback(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--no-proof", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "does/not/exist.ssm"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_python_dash_m_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "ssmc", "check", "--no-proof",
                           str(ERR[0])], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("check", "explain", "run", "compile"):
        assert command in text
        sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        assert sub.description and len(sub.format_help()) > 100


@pytest.mark.parametrize("name", ["mamba2", "gla", "lssl_hippo", "toeplitz"])
def test_check_runs_the_symbolic_proof(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "examples" / f"{name}.ssm")]) == 0
    proof = [line for line in capsys.readouterr().out.splitlines() if "proof" in line]
    assert len(proof) == 1 and "= M for" in proof[0] and "y" in proof[0]


def test_explain_shows_every_allowed_form(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(ROOT / "examples" / "mamba2.ssm"), "--seqlen", "16384"]) == 0
    out = capsys.readouterr().out
    for form in ("recurrent", "quadratic", "chunked"):
        assert form in out
    assert "chose chunked" in out


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"ssmc": parser, **sub.choices}


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_and_every_command_an_example(name: str) -> None:
    command = _commands()[name]
    assert command.description and len(command.description) > 40, name
    assert command.epilog and "\n  ssmc " in "\n" + command.epilog.replace("example:\n", ""), name
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions)
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.dest}"
    text = command.format_help()
    assert "example" in text and "ssmc " in text.split("example", 1)[1]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_examples_in_help_parse(name: str) -> None:
    """Every example line under --help is a valid command line for the parser."""
    command = _commands()[name]
    lines = [line.strip() for line in (command.epilog or "").splitlines() if line.startswith("  ")]
    assert lines
    for line in lines:
        words = shlex.split(line.split("#", 1)[0])
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # an environment variable before it
            words.pop(0)
        assert words[0] == "ssmc", line
        build_parser().parse_args(words[1:])

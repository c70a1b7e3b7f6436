"""Every option of every ``servekit`` command says what it does; a user's mistake is one line and an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from servekit import cli
from servekit.bench import build_report_parser
from servekit.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]
# The installed command where there is one (the venv's console script), else the module.
_SCRIPT = Path(sys.executable).parent / "servekit"
SERVEKIT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "servekit.cli"]
EXIT_CODES = {v for k, v in vars(importlib.import_module("servekit.errors")).items() if k.startswith("EXIT_")}
OWN_ACTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def walk(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, str | None]]:
    """``parser`` and every subcommand parser below it, each with the help its parent lists it with."""
    yield parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                for found, text in walk(sub):
                    yield found, listed.get(name) if found is sub else text


def all_parsers() -> list[tuple[argparse.ArgumentParser, str | None]]:
    """The ``servekit`` parser as main() builds it, and those of the commands it hands over (reload, bench, proxy)."""
    found = list(walk(cli.build_parser()))
    for name, module in cli.DELEGATED.items():
        mod = importlib.import_module(module)
        assert hasattr(mod, "build_parser"), f"{module} (`servekit {name}`) has no build_parser() to check"
        found += walk(mod.build_parser())
    return found + list(walk(build_report_parser()))


PARSERS = all_parsers()


def test_the_walk_reaches_every_command():
    progs = {p.prog for p, _ in PARSERS}
    expected = {"servekit", "servekit serve", "servekit reload", "servekit reload watch", "servekit reload rollout"}
    assert expected | {"servekit bench", "servekit bench report", "servekit proxy"} <= progs
    assert sum(len(p._actions) for p, _ in PARSERS) > 100


@pytest.mark.parametrize("parser,listed", PARSERS, ids=[p.prog for p, _ in PARSERS])
def test_every_argument_and_subcommand_has_help(parser: argparse.ArgumentParser, listed: str | None):
    # A subcommand: the help its parent lists it with, or its own description; a top-level parser: its description.
    assert (listed or "").strip() or (parser.description or "").strip(), f"{parser.prog}: no help or description"
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, OWN_ACTIONS) and (not a.help or a.help == argparse.SUPPRESS or not str(a.help).strip())
    ]
    assert not missing, f"{parser.prog}: arguments without help: {missing}"
    parser.format_help()  # a stray % in a help string fails here, not in front of a user


def test_main_uses_build_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == EXIT_OK
    assert "--watcher-port" in capsys.readouterr().out


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVEKIT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_unknown_subcommand_is_a_usage_error():
    proc = run("no-such-command")
    assert proc.returncode == EXIT_USAGE
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_image_is_one_line_and_not_a_usage_error(tmp_path):
    missing = tmp_path / "missing.png"
    proc = run("predict", str(missing), "--run-dir", str(tmp_path), "--model-store", str(tmp_path))
    line = assert_one_line_error(proc)
    assert str(missing) in line and "No such file" in line
    assert proc.returncode == EXIT_FAILED and proc.returncode != EXIT_USAGE


def test_missing_archive_to_publish_is_one_line(tmp_path):
    proc = run("publish", str(tmp_path / "digits-1.0.mar"), "--model-store", str(tmp_path))
    assert_one_line_error(proc)
    assert proc.returncode == EXIT_FAILED


def test_health_of_an_empty_run_dir_says_why(tmp_path):
    proc = run("health", "--run-dir", str(tmp_path), "--model-store", str(tmp_path))
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == EXIT_FAILED and proc.returncode in EXIT_CODES
    assert proc.stdout.strip().startswith("unhealthy: ") and "key_file.json" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1


def test_key_without_a_server_is_unreachable_not_a_usage_error(tmp_path):
    proc = run("key", "--run-dir", str(tmp_path), "--model-store", str(tmp_path))
    assert "is TorchServe running" in assert_one_line_error(proc)
    assert proc.returncode in EXIT_CODES - {EXIT_OK, EXIT_USAGE}


def test_a_bad_port_in_the_environment_is_a_usage_error_not_a_traceback(tmp_path):
    env = {**os.environ, "SERVEKIT_WATCHER_PORT": "eighty"}
    proc = run("serve", "--run-dir", str(tmp_path), "--model-store", str(tmp_path), env=env)
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stderr and "--watcher-port" in proc.stderr and "eighty" in proc.stderr
    assert not (tmp_path / "logs").exists()  # nothing started

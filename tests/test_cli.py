"""The command line as a whole: every command answers --help, and the tool its version."""

from importlib.metadata import version

import pytest

from kinetoscope.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: kinetoscope {command}")


def test_the_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kinetoscope {version('kinetoscope')}"

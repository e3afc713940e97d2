"""The command line: the install hint for missing extras whatever arguments follow."""

from __future__ import annotations

import sys

import pytest

from jacobi_engine import cli


@pytest.mark.parametrize("argv", [["collect", "--model", "X", "--prompts", "p.jsonl"], ["train"], ["train", "-x"]])
def test_missing_training_extras_prints_the_hint(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "jacobi_engine.training.commands", None)  # import raises ImportError
    training = sys.modules.get("jacobi_engine.training")
    if training is not None:  # imported by an earlier test: `from ... import commands` reads the attribute
        monkeypatch.delattr(training, "commands", raising=False)
    assert cli.main(argv) == 2
    assert "jacobi-engine[train]" in capsys.readouterr().err


def test_unknown_arguments_still_fail_for_real_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err

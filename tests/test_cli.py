"""Commands that only read a study never create a storage: a study that does not exist is one
line naming the fix, exit 2, and nothing is left behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from tuner.cli import main

SPACE = str(REPO / "search_spaces" / "sim-qwen3-30b-a3b-1x4090.yaml")


@pytest.mark.parametrize("command", [["best"], ["export", "--out", "x.yaml"], ["report"]])
def test_read_only_commands_on_a_missing_study_create_nothing(tmp_path: Path, command: list[str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    studies = tmp_path / "studies"
    rc = main([command[0], "--space", SPACE, "--study", "nosuch", "--studies-dir", str(studies), *command[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no study database" in err and "kttune run" in err
    assert not studies.exists() and not list(tmp_path.iterdir())


def test_version_and_a_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("kttune 0.")
    with pytest.raises(SystemExit) as done:
        main([])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "(see kttune --help)" in err

"""The flags a placement space passes are checked against the installed server before any launch:
placement params, and the recording launch's flags; tuned environment variables are no flags."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO
from tuner.config import parse_space
from tuner.errors import ConfigError
from tuner.preflight.compat import check_space_compat, server_flags

SPACE = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20-placement.yaml"


def test_placement_spaces_check_the_recording_flags_and_not_env_params() -> None:
    flags = server_flags(parse_space(yaml.safe_load(SPACE.read_text()), check_paths=False))
    assert "--kt-expert-placement-strategy" in flags and "--kt-enable-dynamic-expert-update" in flags
    assert "--expert-distribution-recorder-mode" in flags and "--init-expert-location" in flags
    assert not [f for f in flags if "KT_RAWINT4_BACKEND" in f]


def test_an_upstream_server_refuses_placement_params_before_any_launch() -> None:
    data = yaml.safe_load(SPACE.read_text())
    data["server"]["args"]["sim-dialect"] = "upstream"
    space = parse_space(data, check_paths=False)
    with pytest.raises(ConfigError, match="kt-expert-placement-strategy"):
        check_space_compat(space)

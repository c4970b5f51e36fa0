"""Params that are environment variables, the placement choice that reads the study's recording,
and accuracy knobs guarded by the quality check."""
from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tuner.config import EXPERT_LOCATION_FLAG, PLACEMENT_FLAG, parse_space, split_env
from tuner.errors import ConfigError

PLACEMENT = REPO / "search_spaces" / "sim-kimi-k2-thinking-8xl20-placement.yaml"


def _data() -> dict[str, Any]:
    return yaml.safe_load(PLACEMENT.read_text())


def test_an_env_param_is_searched_and_split_from_the_flags() -> None:
    space = parse_space(_data(), check_paths=False)
    assert "env:KT_RAWINT4_BACKEND" in space.distributions()
    flags = space.launch_flags(space.baseline or {})
    plain, env = split_env(flags)
    assert env == {"KT_RAWINT4_BACKEND": "amx"}
    assert not [k for k in plain if k.startswith("env:")] and plain["kt-num-gpu-experts"] == 200


@pytest.mark.parametrize("key, words", [("env:kt_backend", "bad environment variable name"),
                                        ("env:HF_HUB_OFFLINE", "also fixed in server.env")])
def test_bad_env_params_are_refused_naming_the_field(key: str, words: str) -> None:
    data = _data()
    data["server"]["env"] = {"HF_HUB_OFFLINE": "1"}
    data["params"][key] = {"choices": ["a", "b"]}
    data.pop("baseline")
    with pytest.raises(ConfigError, match=words) as exc:
        parse_space(data, check_paths=False)
    assert key in str(exc.value)


def test_frequency_reads_the_recorded_distribution_and_uniform_does_not() -> None:
    space = parse_space(_data(), check_paths=False)
    base = dict(space.baseline or {})
    assert space.offers_frequency_placement()
    freq = space.launch_flags({**base, PLACEMENT_FLAG: "frequency"}, expert_location="/d/x.pt")
    assert freq[EXPERT_LOCATION_FLAG] == "/d/x.pt"
    assert EXPERT_LOCATION_FLAG not in space.launch_flags(base, expert_location="/d/x.pt")
    assert EXPERT_LOCATION_FLAG not in space.launch_flags({**base, PLACEMENT_FLAG: "frequency"})
    data = _data()
    data["params"][PLACEMENT_FLAG] = {"choices": ["uniform", "random"]}
    data["baseline"][PLACEMENT_FLAG] = "uniform"
    assert not parse_space(data, check_paths=False).offers_frequency_placement()


def test_an_accuracy_knob_is_searchable_only_with_the_quality_check() -> None:
    data = _data()
    data["params"]["kt-max-deferred-experts-per-token"] = {"low": 0, "high": 4}
    data.pop("baseline")
    assert parse_space(data, check_paths=False)  # the quality check is on by default
    for off in ({"enabled": False}, {"check_logprobs": False}):
        data["quality"] = off
        with pytest.raises(ConfigError, match="params.kt-max-deferred-experts-per-token: changes the model's outputs"):
            parse_space(data, check_paths=False)
    data["params"].pop("kt-max-deferred-experts-per-token")
    data["server"]["args"]["kt-max-deferred-experts-per-token"] = 2   # fixed: the user's own choice
    assert parse_space(data, check_paths=False)

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from tuner.config import load_space, parse_space
from tuner.errors import ConfigError

SIM = Path("search_spaces/sim-kimi-k2-thinking-8xl20.yaml")
KIMI = Path("search_spaces/kimi-k2-thinking-8xl20.yaml")


def raw(path: Path = SIM) -> dict:
    return yaml.safe_load(path.read_text())


def parse(data: dict):
    return parse_space(data, check_paths=False)


def test_shipped_spaces_load_with_the_five_knobs_and_seed_baseline() -> None:
    for path in (SIM, KIMI):
        space = load_space(path, check_paths=False)
        assert [p.flag for p in space.params] == ["kt-num-gpu-experts", "kt-cpuinfer", "kt-threadpool-count",
                                                  "chunked-prefill-size", "max-running-requests"]
        assert space.baseline == {"kt-num-gpu-experts": 200, "kt-cpuinfer": 56, "kt-threadpool-count": 2,
                                  "chunked-prefill-size": 4096, "max-running-requests": 37}
        assert [(w.name, w.num_prompts, w.input_len, w.output_len) for w in space.workloads] == [
            ("prefill", 37, 1024, 1), ("decode", 37, 10, 512)]
        assert [o.key for o in space.objectives] == ["decode.output_throughput"]
        assert space.server.host == "127.0.0.1"


def test_distributions_follow_ranges_steps_and_choices() -> None:
    d = load_space(SIM, check_paths=False).distributions()
    assert d["kt-num-gpu-experts"] == optuna.distributions.IntDistribution(0, 240, step=8)
    assert d["kt-threadpool-count"] == optuna.distributions.CategoricalDistribution((1, 2))


def test_defaults_when_workloads_and_objective_are_omitted() -> None:
    data = raw()
    del data["workloads"], data["objective"]
    space = parse(data)
    assert {w.name for w in space.workloads} == {"prefill", "decode"}
    assert space.directions == ["maximize"]


def test_multi_objective_directions() -> None:
    data = raw()
    data["objective"] = [{"workload": "decode", "metric": "output_throughput"},
                         {"workload": "prefill", "metric": "input_throughput"}]
    assert parse(data).directions == ["maximize", "maximize"]


def test_launch_flags_substitute_tuned_values() -> None:
    space = load_space(SIM, check_paths=False)
    flags = space.launch_flags({"kt-num-gpu-experts": 96})
    assert flags["kt-num-gpu-experts"] == 96 and flags["tensor-parallel-size"] == 8


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["params"].update({"kt-cpuinfer": {"low": 64, "high": 16}}), "params.kt-cpuinfer"),
    (lambda d: d["params"]["kt-cpuinfer"].update({"hgh": 3}), "params.kt-cpuinfer.hgh"),
    (lambda d: d["params"].update({"kt-cpuinfer": {"low": "a", "high": 16}}), "params.kt-cpuinfer.low"),
    (lambda d: d["params"].update({"kt_cpuinfer": {"low": 1, "high": 16}}), "params"),
    (lambda d: d["params"].update({"port": {"low": 1, "high": 16}}), "params.port"),
    (lambda d: d["params"].update({"kt-threadpool-count": {"choices": []}}), "params.kt-threadpool-count.choices"),
    (lambda d: d["params"].update({"kt-num-gpu-experts": {"low": 0, "high": 10, "step": 3}}), "params.kt-num-gpu-experts"),
    (lambda d: d.update({"extra": 1}), "space.extra"),
    (lambda d: d.pop("params"), "space.params"),
    (lambda d: d["server"]["args"].pop("model-path"), "server.args.model-path"),
    (lambda d: d["workloads"]["decode"].update({"num_prompts": 0}), "workloads.decode.num_prompts"),
    (lambda d: d["objective"][0].update({"workload": "nope"}), "objective[0].workload"),
    (lambda d: d["objective"][0].update({"direction": "up"}), "objective[0].direction"),
    (lambda d: d["baseline"].update({"kt-cpuinfer": 999}), "baseline.kt-cpuinfer"),
    (lambda d: d["baseline"].pop("kt-cpuinfer"), "baseline"),
    (lambda d: d["server"].update({"python": "/nonexistent/python"}), "server.python"),
    (lambda d: d["server"].update({"port": 70000}), "server.port"),
    (lambda d: d.update({"confirm": {"noise": 2}}), "confirm.noise"),
    (lambda d: d.update({"confirm": {"recheck": "yes"}}), "confirm.recheck"),
    (lambda d: d.update({"feasibility": {"boundary_failures": -1}}), "feasibility.boundary_failures"),
    (lambda d: d.update({"feasibility": {"margin": 1}}), "feasibility.margin"),
    (lambda d: d["server"]["args"].update({"kt-cpuinfer": 22}), "server.args.kt-cpuinfer"),
    (lambda d: d["objective"][0].update({"metric": "output_thruput"}), "objective[0].metric"),
    (lambda d: d["workloads"]["decode"].update({"dataset_name": "randm"}), "workloads.decode.dataset_name"),
    (lambda d: d["params"].update({"max-running-requests": {"low": 8.0, "high": 64}}), "params.max-running-requests.low"),
    (lambda d: d["params"].update({"max-running-requests": {"low": 8, "high": 64, "type": "float"}}),
     "params.max-running-requests.type"),
    (lambda d: d["params"].update({"kt-threadpool-count": {"choices": [1, 2.0]}}), "params.kt-threadpool-count.choices"),
    (lambda d: d["params"].update({"mem-fraction-static": {"low": 0.5, "high": 0.9, "type": "int"}}),
     "params.mem-fraction-static.low"),
])
def test_bad_input_names_the_field(mutate, field: str) -> None:
    data = copy.deepcopy(raw())
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_space(data, check_paths=field == "server.python")
    msg = str(err.value)
    assert msg.startswith(field), msg
    assert "\n" not in msg and ";" in msg  # one line: problem; fix


def test_missing_model_path_on_disk_is_refused() -> None:
    data = raw()
    data["server"]["args"]["model-path"] = "/nonexistent/model"
    with pytest.raises(ConfigError, match="server.args.model-path"):
        parse_space(data, check_paths=True)


def test_float_ranges_stay_for_float_flags() -> None:
    data = raw()
    data["params"]["mem-fraction-static"] = {"low": 0.80, "high": 0.95}
    del data["server"]["args"]["mem-fraction-static"]
    data.pop("baseline")
    spec = next(p for p in parse(data).params if p.flag == "mem-fraction-static")
    assert spec.is_float and (spec.low, spec.high) == (0.8, 0.95)


def test_missing_tokenizer_path_is_refused_but_a_hub_id_is_not() -> None:
    data = raw()
    data["bench"]["tokenizer"] = "/nonexistent/tokenizer"
    with pytest.raises(ConfigError, match=r"^bench\.tokenizer: /nonexistent/tokenizer does not exist"):
        parse_space(data, check_paths=True)
    data["bench"]["tokenizer"] = "moonshotai/Kimi-K2-Thinking"
    assert parse_space(data, check_paths=True).bench.tokenizer == "moonshotai/Kimi-K2-Thinking"


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)


def test_slos_in_both_spellings() -> None:
    data = raw()
    data["slo"] = [{"workload": "decode", "metric": "median_itl_ms", "max": 900}, "prefill.p99_ttft_ms <= 5000",
                   "decode.output_throughput >= 30"]
    slos = parse(data).slos
    assert [(s.key, s.max, s.min) for s in slos] == [("decode.median_itl_ms", 900, None),
                                                      ("prefill.p99_ttft_ms", 5000, None),
                                                      ("decode.output_throughput", None, 30)]
    assert slos[0].violation(990) == pytest.approx(0.1) and slos[0].violation(450) < 0
    assert slos[2].violation(33) < 0 < slos[2].violation(27)


@pytest.mark.parametrize("slo, field", [
    (["decode.p99_ttft_ms << 5"], "slo[0]"),
    ([{"workload": "decode", "metric": "p99_ttft_ms"}], "slo[0]"),
    ([{"workload": "decode", "metric": "p99_ttfb_ms", "max": 1}], "slo[0].metric"),
    ([{"workload": "nope", "metric": "x", "max": 1}], "slo[0].workload"),
    ({"decode": 1}, "slo"),
])
def test_bad_slo_names_the_field(slo, field: str) -> None:
    data = raw()
    data["slo"] = slo
    with pytest.raises(ConfigError) as err:
        parse(data)
    assert str(err.value).startswith(field)


def test_quality_section_is_validated() -> None:
    data = raw()
    data["quality"] = {"enabled": False}
    assert parse(data).quality.enabled is False
    data["quality"] = {"enabeld": False}
    with pytest.raises(ConfigError, match=r"^quality\.enabeld"):
        parse(data)


def test_a_fixed_arg_follows_a_tuned_flag_it_names_in_braces() -> None:
    # kt-kernel's AMX weights are cut per thread-pool count: the folder must follow the tuned count
    data = raw()
    data["server"]["args"]["kt-weight-path"] = "/w/kimi-pools{kt-threadpool-count}"
    data["server"]["args"]["json-model-override-args"] = '{"rope_scaling": null}'
    space = parse(data)
    flags = space.launch_flags({**space.baseline, "kt-threadpool-count": 1})
    assert flags["kt-weight-path"] == "/w/kimi-pools1"
    assert space.launch_flags({**space.baseline, "kt-threadpool-count": 2})["kt-weight-path"] == "/w/kimi-pools2"
    assert flags["json-model-override-args"] == '{"rope_scaling": null}'  # JSON is no reference


def test_a_brace_reference_to_no_flag_is_refused_with_the_field() -> None:
    data = raw()
    data["server"]["args"]["kt-weight-path"] = "/w/kimi-pools{kt-threadpool}"
    with pytest.raises(ConfigError, match=r"server\.args\.kt-weight-path.*\{kt-threadpool\} names no flag of the space"):
        parse(data)


def test_every_folder_a_braced_arg_can_name_is_listed_once() -> None:
    data = raw()
    data["server"]["args"]["kt-weight-path"] = "/w/p{kt-threadpool-count}-c{chunked-prefill-size}"
    space = parse(data)
    assert len(space.fixed_arg_values("kt-weight-path")) == 2 * 4  # pools [1, 2] x chunks [1024 .. 8192]
    assert "/w/p2-c8192" in space.fixed_arg_values("kt-weight-path")

"""Report data (statuses, front, weights pick, importances, baseline vs best), its rendering,
and the `best` / `export --weights` / `report` commands, on a study built through the real
recording path (tuner.storage.record + tuner.outcome) with synthetic measurements."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tuner import outcome as objective
from tuner.cli import main
from tuner.config import parse_space
from tuner.errors import ConfigError, KttuneError
from tuner.report.comparison import compare
from tuner.report.data import compute_report
from tuner.report.export import export_profile, parse_weights, pick_trial
from tuner.report.html import render_html
from tuner.report.status import DUPLICATE, FAILED, FEASIBLE, INFEASIBLE, VIOLATES, classify_trial
from tuner.report.text import print_best
from tuner.search.sampler import make_sampler
from tuner.selection import pick_by_weights, weighted_scores
from tuner.storage.attrs import ATTR_BASELINE, ATTR_DUPLICATE_OF, ATTR_FLAGS, ATTR_LAUNCHED, metrics_of
from tuner.storage.open import open_study
from tuner.storage.record import record

SPACE_FILE = Path(__file__).resolve().parents[2] / "search_spaces/sim-kimi-k2-thinking-8xl20.yaml"
OBJ2 = [{"workload": "decode", "metric": "output_throughput", "direction": "maximize"},
        {"workload": "prefill", "metric": "input_throughput", "direction": "maximize"}]
BASELINE = {"kt-num-gpu-experts": 200, "kt-cpuinfer": 56, "kt-threadpool-count": 2, "chunked-prefill-size": 4096,
            "max-running-requests": 37}


def space_data(n_objectives: int = 2, itl_max: float | None = 1000.0) -> dict:
    data = yaml.safe_load(SPACE_FILE.read_text())
    data["objective"] = OBJ2[:n_objectives]
    if itl_max is not None:
        data["slo"] = [{"workload": "decode", "metric": "p99_itl_ms", "max": itl_max}]
    return data


def synth(p: dict) -> dict[str, float]:
    """Decode rides on GPU experts, prefill loses to concurrency, ITL grows with concurrency."""
    n, r = p["kt-num-gpu-experts"], p["max-running-requests"]
    return {"decode.output_throughput": 10 + 0.2 * n + 0.05 * r, "prefill.input_throughput": 300 + 0.5 * n - 4 * r,
            "decode.p99_itl_ms": 100 + 18 * r, "decode.median_ttft_ms": 3000 + 10 * r, "prefill.p99_itl_ms": 0.0}


def build_study(tmp_path: Path, data: dict, n_random: int = 16) -> tuple[object, optuna.Study, str]:
    space = parse_space(data, check_paths=False)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(space, study_name="t", storage=url, sampler=make_sampler(space, 0))
    rng = random.Random(7)
    plan: list[tuple[dict, str]] = [(BASELINE, "ok")]
    for _ in range(n_random):
        plan.append(({"kt-num-gpu-experts": rng.randrange(0, 241, 8), "kt-cpuinfer": rng.randrange(16, 65, 4),
                      "kt-threadpool-count": rng.choice([1, 2]), "chunked-prefill-size": rng.choice([1024, 2048, 4096, 8192]),
                      "max-running-requests": rng.randint(8, 64)}, "ok"))
    plan += [({**BASELINE, "kt-num-gpu-experts": 240, "chunked-prefill-size": 8192}, "oom"),
             ({**BASELINE, "kt-cpuinfer": 60}, "bench_no_result"), (plan[1][0], "duplicate")]
    for i, (params, kind) in enumerate(plan):
        study.enqueue_trial(params, user_attrs={ATTR_BASELINE: True} if i == 0 else {})
        trial = study.ask(space.distributions())
        trial.set_user_attr(ATTR_FLAGS, space.launch_flags(trial.params))
        if kind == "duplicate":
            dup = study.trials[1]
            out = objective.TrialOutcome(dup.state, list(dup.values), None, "duplicate of trial 1", {}, dict(dup.constraints))
            record(study, trial, out, {ATTR_DUPLICATE_OF: 1})
            continue
        trial.set_user_attr(ATTR_LAUNCHED, True)
        out = objective.success(space, synth(params), {}) if kind == "ok" else objective.failure(space, kind, "x")
        record(study, trial, out, {"wall_s": 20.0 + i})
    return space, study, url


@pytest.fixture(scope="module")
def mo(tmp_path_factory: pytest.TempPathFactory):
    """Read-only for the tests that use it: built once per module."""
    return build_study(tmp_path_factory.mktemp("mo"), space_data())


def test_trial_statuses(mo) -> None:
    space, study, _ = mo
    trials = study.get_trials()
    status = [classify_trial(t) for t in trials]
    assert status[-3:] == [INFEASIBLE, FAILED, DUPLICATE]
    for t, s in zip(trials[:-3], status):
        over = metrics_of(t)["decode.p99_itl_ms"] > 1000
        assert s == (VIOLATES if over else FEASIBLE), (t.number, s)
    assert VIOLATES in status and FEASIBLE in status


def test_report_data_front_baseline_and_counts(mo) -> None:
    space, study, _ = mo
    data = compute_report(space, study)
    feasible = [t for t in study.get_trials() if classify_trial(t) == FEASIBLE]
    # The front is Optuna's feasible Pareto front: no SLO violator, nothing dominated.
    assert set(data.front) == {t.number for t in study.best_trials}
    assert len(data.front) > 1 and data.multi_objective
    for n in data.front:
        assert data.row(n).status == FEASIBLE
        v = metrics_of(study.trials[n])
        assert not any(metrics_of(t)["decode.output_throughput"] > v["decode.output_throughput"] and
                       metrics_of(t)["prefill.input_throughput"] > v["prefill.input_throughput"] for t in feasible)
    assert data.recommended in data.front and data.baseline == 0
    assert data.failure_counts == {"oom": 1, "bench_no_result": 1}
    n_violating = sum(1 for t in study.get_trials() if classify_trial(t) == VIOLATES)
    assert data.violation_counts == {"slo:decode.p99_itl_ms": n_violating}
    assert data.status_counts[INFEASIBLE] == 1 and data.status_counts[DUPLICATE] == 1
    assert data.choices["chunked-prefill-size"] == (1024, 2048, 4096, 8192)
    json.dumps(data.to_dict())  # serialisable as report.json


def test_a_baseline_that_is_still_the_best_is_not_compared_with_itself(mo) -> None:
    space, study, _ = mo
    data = compute_report(space, study)
    assert data.recommended == data.baseline == 0  # this study's equal-weights pick is the baseline
    assert data.comparison == ()
    assert any("baseline (trial 0) is still the best" in n and "no comparison" in n for n in data.notes)
    html = render_html(data, {})
    assert "vs best" not in html and "+0.0%" not in html


def test_baseline_vs_best_uses_measured_numbers(mo) -> None:
    space, study, _ = mo
    data = compute_report(space, study)
    other = next(n for n in data.front if n != data.baseline)
    keys = ["decode.output_throughput", "prefill.input_throughput", "decode.p99_itl_ms"]
    comparison = compare(space, study, study.trials[0], study.trials[other])
    base, best = metrics_of(study.trials[0]), metrics_of(study.trials[other])  # one launch each here
    by_metric = {c.metric: c for c in comparison}
    assert [c.metric for c in comparison[:3]] == keys
    c = by_metric["prefill.input_throughput"]
    assert c.baseline == base["prefill.input_throughput"] and c.best == best["prefill.input_throughput"]
    assert c.change_pct == pytest.approx(100 * (c.best - c.baseline) / c.baseline)
    assert by_metric["decode.p99_itl_ms"].higher_is_better is False
    assert "prefill.p99_itl_ms" not in by_metric  # zero on both sides: a 1-token job has no ITL


@pytest.mark.parametrize("sklearn", [True, False], ids=["fanova", "ped-anova"])
def test_importances_find_the_knob_that_drives_each_objective(mo, sklearn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if sklearn:
        pytest.importorskip("sklearn")
    else:
        monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn → ImportError
    space, study, _ = mo
    imps = {i.objective: i for i in compute_report(space, study).importances}
    assert imps["decode.output_throughput"].evaluator == ("Fanova" if sklearn else "PedAnova")
    dec, pre = imps["decode.output_throughput"], imps["prefill.input_throughput"]
    assert dec.evaluator and sum(dec.values.values()) == pytest.approx(1.0)
    assert next(iter(dec.values)) == "kt-num-gpu-experts"
    assert next(iter(pre.values)) == "max-running-requests"


def test_importances_say_why_when_too_few_trials(tmp_path: Path) -> None:
    space, study, _ = build_study(tmp_path, space_data(), n_random=1)
    imp = compute_report(space, study).importances[0]
    assert imp.values == {} and "needs" in imp.note


def test_parse_weights_accepts_full_workload_and_metric_names() -> None:
    keys = ["decode.output_throughput", "prefill.input_throughput"]
    assert parse_weights("decode.output_throughput=2, prefill=1", keys) == {"decode.output_throughput": 2.0,
                                                                           "prefill.input_throughput": 1.0}
    assert parse_weights("input_throughput=3", keys) == {"prefill.input_throughput": 3.0}
    for bad in ("decode", "nope=1", "decode=-1", "decode=x", "decode=0", "throughput=1"):
        with pytest.raises(ConfigError, match="--weights"):
            parse_weights(bad, ["decode.output_throughput", "prefill.input_throughput", "decode.input_throughput"]
                          if bad == "throughput=1" else keys)


def test_weights_pick_along_the_front(mo) -> None:
    space, study, _ = mo
    front = study.best_trials
    objs = [(o.key, o.direction) for o in space.objectives]
    top_decode = max(front, key=lambda t: t.values[0])
    top_prefill = max(front, key=lambda t: t.values[1])
    assert pick_by_weights(front, objs, {"decode.output_throughput": 1}).number == top_decode.number
    assert pick_by_weights(front, objs, {"prefill.input_throughput": 1}).number == top_prefill.number
    scores = weighted_scores(front, objs, {"decode.output_throughput": 1, "prefill.input_throughput": 1})
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert pick_trial(study, None, space=space, weights={"prefill.input_throughput": 1}).number == top_prefill.number


def test_pick_trial_asks_for_a_choice_on_a_front(mo) -> None:
    space, study, _ = mo
    with pytest.raises(ConfigError, match="--weights"):
        pick_trial(study, None, space=space)
    with pytest.raises(ConfigError, match="exclude"):
        pick_trial(study, 0, space=space, weights={"prefill.input_throughput": 1})


def test_no_trial_meets_the_slo_is_said_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space, study, url = build_study(tmp_path, space_data(itl_max=50.0), n_random=4)
    with pytest.raises(KttuneError, match=r"no measured trial meets every constraint.*slo:decode\.p99_itl_ms"):
        pick_trial(study, None, space=space)
    assert print_best(space, "t", url) is False
    out = capsys.readouterr().out
    assert "SLOs: decode.p99_itl_ms <= 50" in out and "closest is trial" in out
    assert "no measured trial" in compute_report(space, study).notes[0]


def test_export_with_weights_writes_that_trials_flags(mo, tmp_path: Path) -> None:
    space, study, url = mo
    out, verdict = export_profile(space, "t", url, tmp_path / "best.yaml", weights={"decode.output_throughput": 1})
    chosen = max(study.best_trials, key=lambda t: t.values[0])
    text = out.read_text()
    assert f"# trial: {chosen.number}" in text
    assert yaml.safe_load(text)["kt-num-gpu-experts"] == chosen.params["kt-num-gpu-experts"]


def test_cli_best_export_report(mo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    space, study, url = mo
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space_data()))
    common = ["--space", str(space_file), "--study", "t", "--storage", url]
    assert main(["best", *common]) == 0
    assert "Pareto front:" in capsys.readouterr().out
    assert main(["export", *common, "--out", str(tmp_path / "p.yaml")]) == 2  # a front: must choose
    assert "--weights" in capsys.readouterr().err
    assert main(["export", *common, "--out", str(tmp_path / "p.yaml"), "--weights", "prefill=1"]) == 0
    assert main(["export", *common, "--out", str(tmp_path / "q.yaml"), "--weights", "ttft=1"]) == 2
    assert main(["report", *common, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "pareto.png").exists()


def test_rendered_report_is_self_contained(mo, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tuner.report.figures import plot_pareto
    from tuner.report.html import write_report

    space, study, _ = mo
    data = compute_report(space, study)
    files = write_report(data, tmp_path / "r")
    assert {"history", "pareto", "importance", "slices", "contours", "failures"} <= set(files.images)
    for p in files.images.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files.html.read_text()
    assert html.count("data:image/png;base64,") == len(files.images)
    assert "src='http" not in html and 'src="http' not in html and "<link" not in html
    assert "Pareto front" in html and "slo:decode.p99_itl_ms" in html
    assert json.loads(files.json.read_text())["front"] == list(data.front)
    single = compute_report(parse_space(space_data(n_objectives=1), check_paths=False), study)
    assert plot_pareto(single) is None


def test_stale_figures_are_removed(mo, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tuner.report.html import write_report

    space, study, _ = mo
    out = tmp_path / "r"
    out.mkdir()
    (out / "pareto.png").write_bytes(b"old")
    single = compute_report(parse_space(space_data(n_objectives=1), check_paths=False), study)
    files = write_report(single, out)
    assert "pareto" not in files.images and not (out / "pareto.png").exists()


def test_categorical_axis_keeps_the_spaces_order() -> None:
    from tuner.report.figures import _numeric

    assert _numeric([4096, 1024], (1024, 2048, 4096)) == ([2.0, 0.0], ["1024", "2048", "4096"])
    assert _numeric([3, 1.5]) == ([3.0, 1.5], None)

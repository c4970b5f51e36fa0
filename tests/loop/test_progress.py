"""Progress of `kttune run`: plain lines off a terminal, a live line on one; best and ETA."""
from __future__ import annotations

import io

from tuner.loop.progress import Progress, fmt_duration

OBJ = [("decode.output_throughput", "maximize")]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_with_elapsed_best_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(budget=3, objectives=OBJ, stream=out, clock=clock) as p:
        p.trial_started(0, 1, 3, {"kt-num-gpu-experts": 200})
        clock.t += 30
        p.phase("benchmarking decode")
        clock.t += 70
        p.trial_finished(0, "ok", [45.9])
        p.trial_started(1, 2, 3, {"kt-num-gpu-experts": 96})
        clock.t += 40
        assert p.eta() == 160.0  # 2 launches left x 100 s mean, 40 s of this one gone
        p.trial_finished(1, "oom", [0.0], feasible=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "trial 0 (launch 1/3): kt-num-gpu-experts=200"
    assert lines[1] == "  trial 0: benchmarking decode (launching took 30s, 30s in trial)"
    assert lines[2] == ("trial 0: ok  objective = 45.9 (1m40s; benchmarking decode took 1m10s)  | 1/3 launches done, "
                        "elapsed 1m40s, best decode.output_throughput 45.9, ETA 3m20s")
    assert lines[-1].startswith("trial 1: oom  objective = 0") and "best decode.output_throughput 45.9" in lines[-1]
    assert "ETA 1m10s" in lines[-1]  # mean of 100 s and 40 s, one launch left


def test_infeasible_results_never_become_best_and_minimize_works() -> None:
    p = Progress(budget=5, objectives=[("decode.p99_ttft_ms", "minimize")], stream=io.StringIO())
    p.trial_finished(0, "ok", [900.0], launched=False)
    p.trial_finished(1, "ok", [100.0], feasible=False, launched=False)  # misses an SLO
    p.observe([700.0])
    assert p.best_text() == "best decode.p99_ttft_ms 700"
    assert p.eta() is None and "ETA ?" in p.status_line()


def test_status_line_times_the_phase_not_the_trial() -> None:
    clock = Clock()
    p = Progress(budget=20, objectives=OBJ, stream=io.StringIO(), clock=clock)
    p.trial_started(7, 4, 20, {})
    clock.t += 65
    p.phase("tearing down")
    clock.t += 0.2
    line = p.status_line()
    assert line.startswith("trial 7 · launch 4/20 · tearing down 0.2s (trial 1m05s) · elapsed 1m05s")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_line_on_a_terminal_keeps_log_lines() -> None:
    out = Tty()
    with Progress(budget=2, objectives=OBJ, stream=out) as p:
        assert p._live is not None
        p.trial_started(0, 1, 2, {"x": 1})
        p.phase("launching")
        p.log("memory model was optimistic")
        p.trial_finished(0, "ok", [40.0])
    text = out.getvalue()
    assert "trial 0 (launch 1/2): x=1" in text and "memory model was optimistic" in text
    assert "  trial 0: launching" not in text  # phases go to the live line, not the log


def test_fmt_duration() -> None:
    assert [fmt_duration(s) for s in (None, 0.2, 5, 65, 3600 * 2 + 60 * 5)] == ["?", "0.2s", "5.0s", "1m05s", "2h05m"]

"""Progress of `kttune run`: trial i of N, phase, elapsed, best so far, ETA.

On a terminal one live status line (rich) sits under the scrolling log; elsewhere (CI, a
pipe, a log file) every event is one plain line. The loop calls the same methods either way.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from tuner.report import fmt_seconds as fmt_duration


@dataclass(frozen=True)
class ObjectiveLabel:
    key: str
    direction: str  # "maximize" | "minimize"


class Progress:
    """Receives loop events; keeps elapsed, best-so-far and ETA; prints them.

    ETA = mean wall time of the launches finished in this run × launches left, minus the
    time the current launch has already run. Only feasible results count as best."""

    def __init__(self, *, budget: int, objectives: Sequence[ObjectiveLabel] | Sequence[tuple[str, str]],
                 stream: TextIO | None = None, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self.objectives = tuple(o if isinstance(o, ObjectiveLabel) else ObjectiveLabel(*o) for o in objectives)
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._started = clock()
        self._trial: int | None = None
        self._launch_i = 0
        self._trial_started: float | None = None
        self._phase = "starting"
        self._phase_started = self._started
        self._durations: list[float] = []
        self._best: list[float | None] = [None] * len(self.objectives)
        isatty = getattr(self._stream, "isatty", lambda: False)()
        self._live_wanted = isatty if live is None else live
        self._live: Any = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Progress:
        if self._live_wanted:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            progress = self

            class _Line:
                def __rich__(self) -> Text:
                    return Text(progress.status_line(), style="bold cyan", no_wrap=True, overflow="ellipsis")

            console = Console(file=self._stream, highlight=False)
            self._live = Live(_Line(), console=console, refresh_per_second=2, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ---------------------------------------------------------------- events
    def log(self, msg: str) -> None:
        """A log line (scrolls above the live line on a terminal)."""
        if self._live is not None:
            self._live.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, file=self._stream, flush=True)

    __call__ = log  # a Progress can stand where a `log(str)` callback is expected

    def trial_started(self, number: int, launch_i: int, budget: int, params: Mapping[str, Any]) -> None:
        self.budget = budget
        self._trial, self._launch_i = number, launch_i
        self._trial_started = self._phase_started = self._clock()
        self._phase = "launching"
        knobs = " ".join(f"{k}={v}" for k, v in params.items())
        self.log(f"trial {number} (launch {launch_i}/{budget}): {knobs}")

    def phase(self, name: str) -> None:
        """A new phase of the running trial; the line names how long the one before took."""
        previous, took = self._phase, self._in_phase()
        if name == previous:  # the runner names the phase the line already started in
            return
        self._phase, self._phase_started = name, self._clock()
        if self._live is None:
            self.log(f"  trial {self._trial}: {name} ({previous} took {fmt_duration(took)}, "
                     f"{fmt_duration(self._in_trial())} in trial)")

    def trial_finished(self, number: int, verdict: str, values: Sequence[float] | None, *,
                       feasible: bool = True, launched: bool = True, why: str = "") -> None:
        """`verdict` is "ok" or the failure reason; `values` the objective values (None for a
        failed trial). Infeasible results (an SLO missed, a config that did not fit) are shown
        but never become the best. `launched=False` for trials told without a launch; `why`:
        a failure's decisive line, shown under it so that the run's own output says why."""
        last = ""
        if launched and self._trial == number and self._trial_started is not None:
            self._durations.append(self._clock() - self._trial_started)
            last = f" ({fmt_duration(self._durations[-1])}; {self._phase} took {fmt_duration(self._in_phase())})"
        if launched and self._trial == number:
            self._trial_started = None
            self._phase, self._phase_started = "between trials", self._clock()
        if values is not None and feasible and verdict == "ok":
            self.observe(values)
        shown = "-" if values is None else ", ".join(f"{v:.4g}" for v in values)
        tag = verdict if feasible or verdict != "ok" else "ok, misses a constraint"
        self.log(f"trial {number}: {tag}  objective = {shown}{last}  | {self.summary()}")
        if why and verdict != "ok":
            self.log(f"  why: {why}")

    def observe(self, values: Sequence[float]) -> None:
        """Fold a feasible result into best-so-far (also for results of an earlier run)."""
        for i, (obj, v) in enumerate(zip(self.objectives, values)):
            cur = self._best[i]
            if cur is None or (v > cur if obj.direction == "maximize" else v < cur):
                self._best[i] = float(v)

    # ---------------------------------------------------------------- derived
    def elapsed(self) -> float:
        return self._clock() - self._started

    def _in_phase(self) -> float:
        return self._clock() - self._phase_started

    def _in_trial(self) -> float:
        return 0.0 if self._trial_started is None else self._clock() - self._trial_started

    def eta(self) -> float | None:
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        running = self._trial_started is not None
        left = self.budget - self._launch_i + (1 if running else 0)
        return max(left * mean - (self._in_trial() if running else 0.0), 0.0)

    def best_text(self) -> str:
        if all(b is None for b in self._best):
            return "best -"
        return "best " + ", ".join(f"{o.key} {b:.4g}" for o, b in zip(self.objectives, self._best) if b is not None)

    def summary(self) -> str:
        done = self._launch_i - (1 if self._trial_started is not None else 0)
        return f"{done}/{self.budget} launches done, elapsed {fmt_duration(self.elapsed())}, {self.best_text()}, ETA {fmt_duration(self.eta())}"

    def status_line(self) -> str:
        trial = "waiting" if self._trial is None else f"trial {self._trial} · launch {self._launch_i}/{self.budget}"
        in_trial = "" if self._trial_started is None else f" (trial {fmt_duration(self._in_trial())})"
        return (f"{trial} · {self._phase} {fmt_duration(self._in_phase())}{in_trial} · elapsed {fmt_duration(self.elapsed())}"
                f" · {self.best_text()} · ETA {fmt_duration(self.eta())}")

"""Several `kttune run` workers share one study through a real PostgreSQL server.

The server is the distribution's package, started on loopback by scripts/postgres.sh. Three
workers tune the simulator against one budget; one is SIGKILLed mid-trial. The budget, the
baseline and the no-duplicate rules must hold across workers, the dead worker's trial must be
failed by the heartbeat and launched again, and nothing finished may be lost (the rules
themselves: tests/storage/test_workers.py).
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import optuna
import psutil
import pytest
from optuna.trial import FrozenTrial, TrialState

from tests.conftest import REPO, requires_bench_client
from tests.e2e.test_run_e2e import fast_space
from tuner.server import kill_orphan
from tuner.storage.attrs import (
    ATTR_BASELINE,
    ATTR_CONFIRMATION_OF,
    ATTR_LAUNCHED,
    ATTR_REASON,
    ATTR_WORKER,
    is_interrupted,
)
from tuner.storage.open import make_storage

BUDGET = 6
WORKERS = 3
HEARTBEAT_S = 2  # grace: 4 beats = 8 s
TIME_SCALE = 0.002
STUDY = "pg"


def _unavailable(why: str) -> NoReturn:
    """CI must run this test (it installs PostgreSQL); elsewhere a missing server skips it."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL test cannot run in CI: {why}")
    pytest.skip(why)


@pytest.fixture
def postgres() -> Iterator[str]:
    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is None:
        _unavailable("no PostgreSQL driver: pip install psycopg2-binary")
    folder = Path(tempfile.mkdtemp(prefix="kttune-pg-"))
    res = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), "start", str(folder)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        _unavailable(f"scripts/postgres.sh start failed: {res.stderr.strip()[-600:]}")
    url = res.stdout.strip().splitlines()[-1]
    assert url.startswith("postgresql://postgres@127.0.0.1:")
    yield url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stop = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), "stop", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert not folder.exists()
    with socket.socket() as s:  # the server is gone, not just its folder
        assert s.connect_ex(("127.0.0.1", port)) != 0


def worker(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KTTUNE_HEARTBEAT_S": str(HEARTBEAT_S)}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "tuner.cli", "run", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def trials_of(url: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=make_storage(url)).get_trials()


def running_launch_of(url: str, pid: int) -> FrozenTrial | None:
    for t in trials_of(url):
        if t.state == TrialState.RUNNING and t.user_attrs.get(ATTR_LAUNCHED) \
                and str(t.user_attrs.get(ATTR_WORKER, "")).endswith(f":{pid}"):
            return t
    return None


def live_servers(studies: Path) -> list[int]:
    """Servers that some trial started and that still run (pid and start time match)."""
    alive = []
    for pid_file in studies.glob("*/trial-*/server.pid"):
        data = json.loads(pid_file.read_text())
        try:
            if abs(psutil.Process(int(data["pid"])).create_time() - float(data["create_time"])) < 1:
                alive.append(int(data["pid"]))
        except psutil.NoSuchProcess:
            pass
    return alive


def table(trials: list[FrozenTrial]) -> str:
    """One line a trial, for failure messages."""
    return "\n".join(f"{t.number:3d} {t.state.name:8s} launched={bool(t.user_attrs.get(ATTR_LAUNCHED))!s:5s} "
                     f"reason={t.user_attrs.get(ATTR_REASON)} baseline={t.user_attrs.get(ATTR_BASELINE)} "
                     f"worker={t.user_attrs.get(ATTR_WORKER)} {t.params}" for t in trials)


def reported_finished(log: Path) -> set[int]:
    """Trials a worker's log says it finished (`trial N: ok  objective = ...`)."""
    return {int(m.group(1)) for m in re.finditer(r"^trial (\d+): [^\n]*?  objective = ", log.read_text(), re.M)}


@pytest.mark.e2e
@requires_bench_client
def test_workers_share_budget_baseline_and_survive_a_killed_worker(tmp_path: Path, postgres: str) -> None:
    started = time.monotonic()
    space = fast_space(tmp_path, scale=TIME_SCALE)
    studies = tmp_path / "studies"
    # One seed for all: the workers propose the same configurations, so the no-duplicate
    # rule is exercised rather than left to chance.
    args = ["--space", str(space), "--study", STUDY, "--storage", postgres, "--studies-dir", str(studies),
            "--budget", str(BUDGET), "--seed", "3"]
    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    procs = [worker(args, log) for log in logs]
    victim = procs[1]
    try:
        deadline = time.monotonic() + 150
        killed: FrozenTrial | None = None
        while killed is None and time.monotonic() < deadline:
            time.sleep(1)
            assert victim.poll() is None, logs[1].read_text()[-3000:]
            try:
                killed = running_launch_of(postgres, victim.pid)
            except KeyError:  # the study does not exist yet
                continue
        assert killed is not None, "worker 1 never launched a trial"
        time.sleep(2)  # mid-trial: its server is up or starting
        os.kill(victim.pid, signal.SIGKILL)  # the worker only: its server is orphaned
        victim.wait()
        at_kill = trials_of(postgres)
        finished_at_kill = {t.number: (t.state, t.values) for t in at_kill if t.state.is_finished()}
        # The launch it died in (the one seen, unless that one ended within the 2 s).
        (killed,) = [t for t in at_kill if t.state == TrialState.RUNNING and t.user_attrs.get(ATTR_LAUNCHED)
                     and t.user_attrs.get(ATTR_WORKER) == killed.user_attrs[ATTR_WORKER]]
        for i, p in enumerate(procs):
            if p is not victim:
                assert p.wait(timeout=240) == 0, logs[i].read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    try:
        _check_study(postgres, args, studies, logs, killed, finished_at_kill)
    finally:
        for pid_file in studies.glob("*/trial-*/server.pid"):  # left only if a check failed
            kill_orphan(pid_file)
    print(f"postgres workers: {time.monotonic() - started:.0f}s")


def _check_study(postgres: str, args: list[str], studies: Path, logs: list[Path], killed: FrozenTrial,
                 finished_at_kill: dict[int, tuple[TrialState, list[float] | None]]) -> None:
    trials = trials_of(postgres)
    by_number = {t.number: t for t in trials}
    print(table(trials))  # shown when an assertion below fails
    # The dead worker's launch was failed by the heartbeat (the survivors' check): FAIL with
    # no reason of its own, before anyone restarted a worker on this host.
    dead = by_number[killed.number]
    assert dead.state == TrialState.FAIL and ATTR_REASON not in dead.user_attrs and is_interrupted(dead)
    # The shared budget: exactly BUDGET counted launches, all finished; only the killed one
    # was lost to the kill, and it was launched again by a survivor.
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state.is_finished() for t in trials)
    counted = [t for t in trials if t.user_attrs.get(ATTR_LAUNCHED) and not is_interrupted(t)]
    assert len(counted) == BUDGET
    assert [t.number for t in trials if is_interrupted(t)] == [killed.number]
    # Nothing finished was lost or rewritten.
    assert all((by_number[n].state, by_number[n].values) == v for n, v in finished_at_kill.items())
    # Every launch a worker reported finished is in the study; the survivors reported all theirs.
    reported = set().union(*(reported_finished(log) for log in logs))
    assert reported <= {t.number for t in counted}
    assert {t.number for t in counted if t.user_attrs[ATTR_WORKER] != killed.user_attrs[ATTR_WORKER]} <= reported
    # The baseline ran exactly once, and no configuration was launched twice except as a
    # re-measurement the selection rule asked for (a confirmation of an earlier launch of it).
    assert len([t for t in counted if t.user_attrs.get(ATTR_BASELINE)]) == 1
    params = [tuple(sorted(t.params.items())) for t in counted if t.user_attrs.get(ATTR_CONFIRMATION_OF) is None]
    assert len(set(params)) == len(params)
    for t in counted:
        if t.user_attrs.get(ATTR_CONFIRMATION_OF) is not None:
            assert t.params == by_number[t.user_attrs[ATTR_CONFIRMATION_OF]].params
    # Three workers did the work: more than one of them launched.
    assert len({t.user_attrs[ATTR_WORKER] for t in counted}) >= 2

    # A restarted worker finds the study complete and launches nothing; no server is left (the
    # dead worker's died with it, or the restart killed it from its pid file).
    res = subprocess.run([sys.executable, "-m", "tuner.cli", "run", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "KTTUNE_HEARTBEAT_S": str(HEARTBEAT_S)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{BUDGET}/{BUDGET} launches done" in res.stdout
    assert len(trials_of(postgres)) == len(trials)
    assert live_servers(studies) == []


@pytest.mark.e2e
@requires_bench_client
def test_same_command_with_sqlite_alone(tmp_path: Path) -> None:
    space = fast_space(tmp_path, scale=TIME_SCALE)
    url = f"sqlite:///{tmp_path / 'alone.db'}"
    res = subprocess.run([sys.executable, "-m", "tuner.cli", "run", "--space", str(space), "--study", STUDY,
                          "--storage", url, "--studies-dir", str(tmp_path / "studies"), "--budget", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (only,) = [t for t in trials_of(url) if t.user_attrs.get(ATTR_LAUNCHED)]
    assert only.state == TrialState.COMPLETE and only.user_attrs.get(ATTR_BASELINE) is True

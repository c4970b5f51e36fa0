from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from xdist.scheduler import LoadScopeScheduling

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spaces name paths relative to the repository root, as a user running from it would."""
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True)
def _own_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each test has its own registry of launched servers (tuner.server.registry): leftovers a
    test makes on purpose are seen, and reaped, by that test alone."""
    monkeypatch.setenv("KTTUNE_RUNTIME_DIR", str(tmp_path_factory.mktemp("kttune-runtime")))


def bench_python() -> Path | None:
    p = REPO / ".venv-bench" / "bin" / "python"
    return p if p.exists() else None


requires_bench_client = pytest.mark.skipif(
    bench_python() is None and not os.environ.get("CI"),
    reason="bench client venv missing: run scripts/setup.sh",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ is end-to-end (real processes, the real bench client):
    `pytest -m "not e2e"` is the fast tier."""
    e2e = REPO / "tests" / "e2e"
    for item in items:
        if e2e in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.e2e)


# Modules whose tests share a costly module-scoped fixture (a study the simulator ran, the
# bench client's --help): under pytest-xdist each runs on one worker, so it is built once.
ONE_WORKER_MODULES = frozenset({"tests/test_cli.py", "tests/report/test_report.py", "tests/storage/test_resume.py",
                                "tests/preflight/test_compat.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadScopeScheduling | None:
    """`-n N` (pyproject's addopts): each test is its own unit of work, handed to whichever worker
    is free, except that a module of ONE_WORKER_MODULES is one unit. (xdist's own `loadgroup`
    does this by marks, but cannot group under pytest 9.2: pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "load":
        return None  # another --dist (loadfile, worksteal, ...) keeps xdist's own scheduler
    missing = sorted(m for m in ONE_WORKER_MODULES if not (REPO / m).is_file())
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: ONE_WORKER_MODULES names no module at {missing}; update it")
    from xdist.scheduler import LoadScopeScheduling

    class ModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return ModulesTogether(config, log)

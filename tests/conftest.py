from __future__ import annotations

import os
from pathlib import Path

import pytest

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

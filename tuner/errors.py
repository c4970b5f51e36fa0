"""kttune's exception tree. Messages say what must hold and what was given."""
from __future__ import annotations


class KttuneError(Exception):
    """Base of every error kttune raises on purpose."""


class ConfigError(KttuneError):
    """Bad user input (search space, CLI flag, storage URL, export path). CLI exit code 2."""


class InfeasibleConfig(KttuneError):
    """A configuration predicted (or observed) not to fit the machine."""


class ServerLaunchError(KttuneError):
    """The server process died or printed a known failure line before it was ready."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReadinessTimeout(ServerLaunchError):
    """The server did not become ready within the start timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="start_timeout")


class BenchmarkError(KttuneError):
    """bench_serving failed, wrote no result line, or completed too few requests."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TeardownError(KttuneError):
    """The server tree or its GPU memory could not be released; the study must stop.
    `report` holds what the teardown found (tuner.server.teardown.TeardownReport)."""

    report: object = None

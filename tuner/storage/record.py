"""Telling a verdict: attributes, metrics and constraints stored, then the state."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from tuner.errors import KttuneError
from tuner.outcome import TrialOutcome
from tuner.storage.attrs import ATTR_MESSAGE, ATTR_REASON, CONSTRAINT_PREFIX, METRIC_PREFIX


def record(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, attrs: Mapping[str, Any]) -> None:
    """Store attrs, metrics and constraints, then tell the verdict. Constraints are mirrored
    as user attrs (`c:<name>`) because optuna-dashboard shows those, not Optuna 5's own."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in outcome.metrics.items():
            trial.set_user_attr(METRIC_PREFIX + key, value)
        trial.set_user_attr(ATTR_REASON, outcome.reason)
        trial.set_user_attr(ATTR_MESSAGE, outcome.message[-2000:])
        for key, value in outcome.constraints.items():
            trial.set_constraint(key, value)
            trial.set_user_attr(CONSTRAINT_PREFIX + key, value)
        study.tell(trial, outcome.values, state=outcome.state)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise KttuneError(f"trial {trial.number} was already failed by another worker: this worker's heartbeat "
                          "stopped for longer than the grace period (a suspended machine or a database outage); "
                          "its result is lost, run `kttune run` again to continue the study") from None

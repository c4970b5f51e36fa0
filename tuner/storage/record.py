"""Telling a verdict: attributes, metrics and constraints stored, then the state."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from tuner.errors import KttuneError
from tuner.outcome import TrialOutcome
from tuner.storage.attrs import ATTR_MESSAGE, ATTR_REASON, CONSTRAINT_PREFIX, METRIC_PREFIX

# A stored message keeps its head (where the cause is usually named) and its tail (the last
# lines of a log), cut at line boundaries where it can be.
MESSAGE_HEAD = 600
MESSAGE_TAIL = 1400


def stored_message(message: str) -> str:
    """`message` as stored: whole when short, else its head and tail with an elision mark."""
    if len(message) <= MESSAGE_HEAD + MESSAGE_TAIL:
        return message
    head = message[:MESSAGE_HEAD]
    cut = head.rfind("\n")
    head = head[:cut] if cut > MESSAGE_HEAD // 2 else head
    tail = message[-MESSAGE_TAIL:]
    cut = tail.find("\n")
    tail = tail[cut + 1:] if 0 <= cut < MESSAGE_TAIL // 2 else tail
    return f"{head}\n[… {len(message) - len(head) - len(tail)} characters left out …]\n{tail}"


def record(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, attrs: Mapping[str, Any]) -> None:
    """Store attrs, metrics and constraints, then tell the verdict. Constraints are mirrored
    as user attrs (`c:<name>`) because optuna-dashboard shows those, not Optuna 5's own."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        for key, value in outcome.metrics.items():
            trial.set_user_attr(METRIC_PREFIX + key, value)
        trial.set_user_attr(ATTR_REASON, outcome.reason)
        trial.set_user_attr(ATTR_MESSAGE, stored_message(outcome.message))
        for key, value in outcome.constraints.items():
            trial.set_constraint(key, value)
            trial.set_user_attr(CONSTRAINT_PREFIX + key, value)
        study.tell(trial, outcome.values, state=outcome.state)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise KttuneError(f"trial {trial.number} was already failed by another worker: this worker's heartbeat "
                          "stopped for longer than the grace period (a suspended machine or a database outage); "
                          "its result is lost, run `kttune run` again to continue the study") from None

"""What kind of quantity a bench metric is, from its name as `bench_serving` writes it
(`output_throughput`, `request_throughput`, `median_ttft_ms`, `duration`, …): a rate (per
second, larger is better), a time (smaller is better) or neither (counts, ratios). Names may
carry a workload prefix (`decode.output_throughput`)."""
from __future__ import annotations

import enum
from collections.abc import Mapping


class MetricKind(enum.Enum):
    RATE = "rate"
    TIME = "time"
    OTHER = "other"


_RATE_SUFFIXES = ("_throughput", "_per_s")
_RATE_NAMES = ("request_goodput",)  # requests per second that met every --goodput bound
_TIME_SUFFIXES = ("_ms",)
_TIME_NAMES = ("duration",)


def metric_kind(name: str) -> MetricKind:
    metric = name.rsplit(".", 1)[-1]
    if metric.endswith(_RATE_SUFFIXES) or metric in _RATE_NAMES:
        return MetricKind.RATE
    if metric in _TIME_NAMES or metric.endswith(_TIME_SUFFIXES):
        return MetricKind.TIME
    return MetricKind.OTHER


def higher_is_better(name: str) -> bool | None:
    """True for rates, False for times, None when the name does not say."""
    kind = metric_kind(name)
    return True if kind is MetricKind.RATE else False if kind is MetricKind.TIME else None


# The client re-tokenizes the text it received; far fewer tokens than the server counted means
# the text is not what was generated (empty, or pieces that collapse), whatever the throughput.
MIN_RETOKENIZED_SHARE = 0.5


def retokenized_share(metrics: Mapping[str, float]) -> float | None:
    """total_output_tokens_retokenized / total_output_tokens of one workload's metrics (keys
    without a workload prefix); None when the client did not report both or nothing was
    generated."""
    total = metrics.get("total_output_tokens")
    retok = metrics.get("total_output_tokens_retokenized")
    if total is None or retok is None or total <= 0:
        return None
    return float(retok) / float(total)

"""Numbers as a person reads them: no exponent notation, units from the metric's name."""
from __future__ import annotations

from tuner.report.units import fmt_metric, fmt_number, fmt_seconds


def test_latencies_read_in_ms_s_or_minutes() -> None:
    assert fmt_metric("prefill.median_ttft_ms", 13810.0) == "13.8 s"
    assert fmt_metric("decode.median_itl_ms", 87.25) == "87.2 ms"
    assert fmt_metric("decode.p99_itl_ms", 1234.0) == "1.23 s"
    assert fmt_metric("prefill.p99_ttft_ms", 64600.0) == "1m 04.6s"
    assert fmt_metric("decode.duration", 2.5) == "2.50 s"


def test_rates_and_counts() -> None:
    assert fmt_metric("decode.output_throughput", 46.67000804774095) == "46.7 tok/s"
    assert fmt_metric("prefill.input_throughput", 13810.4) == "13,810 tok/s"
    assert fmt_metric("decode.request_throughput", 0.0912) == "0.0912 req/s"
    assert fmt_metric("decode.completed", 37.0) == "37" and fmt_metric("x", None) == "-"
    assert all("e+" not in fmt_number(v) for v in (1.381e4, 2.5e7, 123456.0))


def test_durations() -> None:
    assert [fmt_seconds(s) for s in (None, 0.2, 9.94, 48.0, 187.0, 3720.0)] == ["?", "0.2s", "9.9s", "48s", "3m07s", "1h02m"]

"""Output-quality guard: a fast config that answers garbage must not win the study.

After the server is ready and before the benchmark, a few fixed prompts go to the native
``POST /generate`` (non-streaming, temperature 0, a few dozen tokens). A reply is *bad* when
it is empty or degenerate (few distinct words, or mostly one short phrase repeating). Where
the server returns input logprobs, the mean logprob of a fixed reference text is compared
with the reference trial's (the baseline): a config whose numerics broke (e.g. too many
deferred experts, kt-max-deferred-experts-per-token) scores that text much worse.

Replies are judged against the reference trial where one exists: a reply that was already
"bad" for the baseline (a model that loops on one prompt) does not count against a config.
"""
from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.config import QualitySpec

# Reasons this module can return (all configuration faults, see tuner.outcome).
REASON_QUALITY = "quality"
REASON_DIED = "server_died"
REASON_TIMEOUT = "quality_timeout"

# HTTP answers that mean "this server has no such API / rejects this request shape": the
# guard cannot judge and steps aside instead of failing every trial of the study.
_UNSUPPORTED_STATUS = frozenset({400, 401, 403, 404, 405, 415, 422, 501})
_MIN_UNITS = 8  # below this many words a ratio says nothing
_UNIT = re.compile(r"[A-Za-z0-9_']+|\S")


# ---------------------------------------------------------------- text metrics (pure)


def text_units(text: str) -> list[str]:
    """Words of ASCII letters/digits, and every other visible character on its own (so
    CJK text, punctuation and code symbols count one unit each)."""
    return _UNIT.findall(text)


def distinct_ratio(units: Sequence[str]) -> float:
    return len(set(units)) / len(units) if units else 0.0


def repeat_fraction(units: Sequence[str], min_repeats: int = 3) -> float:
    """Share of the units covered by the longest stretch where one phrase (of any length)
    repeats back to back at least ``min_repeats`` times: 1.0 for "a b a b a b"."""
    n, best = len(units), 0
    for period in range(1, n // min_repeats + 1):
        run = 0
        for i in range(n - period):
            if units[i] == units[i + period]:
                run += 1
                covered = run + period
                if covered >= min_repeats * period and covered > best:
                    best = covered
            else:
                run = 0
    return best / n if n else 0.0


def reply_problem(text: str, *, min_distinct_ratio: float, max_repeat_fraction: float) -> str | None:
    """Why one reply is unusable ("empty", "low_diversity", "repetitive"), or None."""
    units = text_units(text)
    if not units:
        return "empty"
    if len(units) < _MIN_UNITS:
        return None
    if distinct_ratio(units) < min_distinct_ratio:
        return "low_diversity"
    if repeat_fraction(units) > max_repeat_fraction:
        return "repetitive"
    return None


def mean_input_logprob(meta_info: Mapping[str, Any]) -> tuple[float | None, int]:
    """Mean of SGLang's ``meta_info.input_token_logprobs`` ([logprob, token_id, text] per
    prompt token; the first is None) and how many tokens it covers."""
    entries = meta_info.get("input_token_logprobs")
    if not isinstance(entries, list):
        return None, 0
    values = []
    for e in entries:
        lp = e[0] if isinstance(e, (list, tuple)) and e else e
        if isinstance(lp, (int, float)) and not isinstance(lp, bool) and math.isfinite(lp):
            values.append(float(lp))
    if not values:
        return None, 0
    return sum(values) / len(values), len(entries)


# ---------------------------------------------------------------- the check


@dataclass(frozen=True)
class ReplyCheck:
    prompt: int
    text: str
    problem: str | None
    excused: bool = False  # bad, but the reference trial's reply was bad too


@dataclass(frozen=True)
class QualityResult:
    """What the guard saw. ``reason`` is None when the config may be benchmarked."""

    reason: str | None
    message: str
    fingerprint: str
    replies: tuple[ReplyCheck, ...] = ()
    logprob_mean: float | None = None
    logprob_tokens: int = 0
    reference_logprob_mean: float | None = None
    skipped: str | None = None
    wall_s: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_attr(self) -> dict[str, Any]:
        """JSON for the trial's user attrs (and quality.json in the trial folder)."""
        return {
            "ok": self.ok, "reason": self.reason, "message": self.message,
            "fingerprint": self.fingerprint, "skipped": self.skipped,
            "logprob_mean": self.logprob_mean, "logprob_tokens": self.logprob_tokens,
            "reference_logprob_mean": self.reference_logprob_mean, "wall_s": round(self.wall_s, 3),
            "replies": [{"text": r.text[:500], "problem": r.problem, "excused": r.excused} for r in self.replies],
            "notes": list(self.notes),
        }

    def as_reference(self) -> dict[str, Any] | None:
        """What later trials are compared with; None unless this check passed with replies."""
        if not self.ok or self.skipped or not self.replies:
            return None
        return {"fingerprint": self.fingerprint, "logprob_mean": self.logprob_mean,
                "logprob_tokens": self.logprob_tokens,
                "problems": [r.problem for r in self.replies]}


class _ProbeError(Exception):
    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.status = kind, detail, status


def _post(url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            data = json.loads(resp.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300] if exc.fp else ""
        raise _ProbeError("http", f"HTTP {exc.code} {detail}".strip(), exc.code) from None
    except TimeoutError:
        raise _ProbeError("timeout", f"no answer within {timeout_s:g} s") from None
    except urllib.error.URLError as exc:
        kind = "timeout" if isinstance(exc.reason, (TimeoutError, socket.timeout)) else "conn"
        raise _ProbeError(kind, str(exc.reason)) from None
    except (OSError, ValueError) as exc:  # reset connection, truncated or non-JSON body
        raise _ProbeError("conn", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise _ProbeError("shape", f"expected a JSON object, got {type(data).__name__}")
    return data


def _still_alive(server_alive: Callable[[], bool] | None, checks: int = 3, pause_s: float = 0.5) -> bool:
    """A server that just dropped a request may take a moment to exit: look a few times."""
    if server_alive is None:
        return True
    for i in range(checks):
        if not server_alive():
            return False
        if i < checks - 1:
            time.sleep(pause_s)
    return True


def check_quality(base_url: str, spec: QualitySpec, *, reference: Mapping[str, Any] | None = None,
                  server_alive: Callable[[], bool] | None = None,
                  headers: Mapping[str, str] | None = None) -> QualityResult:
    """Probe a ready server. Never raises for a server fault: the result names the reason
    (``quality``, ``server_died``, ``quality_timeout``) or None when the config is fine."""
    started = time.monotonic()
    fp = spec.fingerprint()
    hdrs = dict(headers or {})
    ref = reference if reference and reference.get("fingerprint") == fp else None
    notes: list[str] = []
    if reference and ref is None:
        notes.append("reference ignored: taken with other quality prompts")

    def failed(exc: _ProbeError, what: str) -> QualityResult:
        if not _still_alive(server_alive):
            return QualityResult(REASON_DIED, f"server died during the quality check ({what}: {exc.detail})", fp,
                                 wall_s=time.monotonic() - started, notes=tuple(notes))
        if exc.kind == "timeout":
            return QualityResult(REASON_TIMEOUT, f"quality check: {what} got no answer within {spec.timeout_s:g} s",
                                 fp, wall_s=time.monotonic() - started, notes=tuple(notes))
        if exc.status in _UNSUPPORTED_STATUS or exc.kind == "shape":
            return QualityResult(None, f"quality check skipped: {what}: {exc.detail}", fp, skipped=exc.detail,
                                 wall_s=time.monotonic() - started, notes=tuple(notes))
        return QualityResult(REASON_QUALITY, f"quality check: {what} failed: {exc.detail}", fp,
                             wall_s=time.monotonic() - started, notes=tuple(notes))

    url = base_url.rstrip("/") + "/generate"
    replies: list[ReplyCheck] = []
    ref_problems = list(ref.get("problems") or []) if ref else []
    for i, prompt in enumerate(spec.prompts):
        body: dict[str, Any] = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": spec.max_new_tokens}}
        try:
            data = _post(url, body, hdrs, spec.timeout_s)
        except _ProbeError as exc:
            return failed(exc, f"prompt {i}")
        text = data.get("text")
        if not isinstance(text, str):
            return failed(_ProbeError("shape", "reply has no 'text'"), f"prompt {i}")
        problem = reply_problem(text, min_distinct_ratio=spec.min_distinct_ratio,
                                max_repeat_fraction=spec.max_repeat_fraction)
        excused = problem is not None and i < len(ref_problems) and ref_problems[i] is not None
        replies.append(ReplyCheck(i, text, problem, excused))

    lp_mean, lp_tokens = None, 0
    if spec.check_logprobs:
        body = {"text": spec.reference_text, "sampling_params": {"temperature": 0, "max_new_tokens": 1},
                "return_logprob": True, "logprob_start_len": 0}
        try:
            data = _post(url, body, hdrs, spec.timeout_s)
        except _ProbeError as exc:
            # A server error here is held against the config only if the reference trial
            # answered the same request; otherwise logprobs may simply not work on this server.
            ref_had_logprobs = bool(ref and isinstance(ref.get("logprob_mean"), (int, float)))
            if exc.kind != "http" or (exc.status not in _UNSUPPORTED_STATUS and ref_had_logprobs):
                return failed(exc, "reference-text logprobs")
            notes.append(f"logprobs unsupported: {exc.detail}")
        else:
            meta = data.get("meta_info")
            lp_mean, lp_tokens = mean_input_logprob(meta if isinstance(meta, Mapping) else {})
            if lp_mean is None:
                notes.append("logprobs unsupported: no input_token_logprobs in the reply")
    return _verdict(spec, fp, replies, lp_mean, lp_tokens, ref, notes, time.monotonic() - started)


def _verdict(spec: QualitySpec, fp: str, replies: list[ReplyCheck], lp_mean: float | None, lp_tokens: int,
             ref: Mapping[str, Any] | None, notes: list[str], wall_s: float) -> QualityResult:
    bad = [r for r in replies if r.problem is not None and not r.excused]
    ref_lp = ref.get("logprob_mean") if ref else None
    problems: list[str] = []
    if replies and len(bad) / len(replies) > spec.max_bad_fraction:
        shown = "; ".join(f"prompt {r.prompt} {r.problem}: {r.text.strip()[:60]!r}" for r in bad[:3])
        problems.append(f"{len(bad)} of {len(replies)} replies unusable ({shown})")
    if lp_mean is not None and isinstance(ref_lp, (int, float)):
        if ref and ref.get("logprob_tokens") not in (None, lp_tokens):
            notes.append(f"logprobs not compared: {lp_tokens} tokens vs {ref.get('logprob_tokens')} in the reference")
        elif ref_lp - lp_mean > spec.max_logprob_drop:
            problems.append(f"reference text mean logprob {lp_mean:.3f} vs {ref_lp:.3f} for the baseline "
                            f"(drop {ref_lp - lp_mean:.3f} > max_logprob_drop {spec.max_logprob_drop:g} nats/token)")
    reason = REASON_QUALITY if problems else None
    message = "quality: " + "; ".join(problems) if problems else "quality ok"
    return QualityResult(reason, message, fp, tuple(replies), lp_mean, lp_tokens,
                         ref_lp if isinstance(ref_lp, (int, float)) else None, None, wall_s, tuple(notes))

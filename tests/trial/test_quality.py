"""Output-quality guard: text metrics, the `quality:` settings, and check_quality against a
scriptable /generate server on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from tuner.config.quality import DEFAULT_PROMPTS, QualitySpec
from tuner.errors import ConfigError
from tuner.trial.quality import check_quality, distinct_ratio, mean_input_logprob, repeat_fraction, reply_problem, text_units

GOOD = {
    DEFAULT_PROMPTS[0]: " red, green and blue. When they are mixed in equal amounts they produce white light, "
                        "which is why screens use tiny dots of these colors.",
    DEFAULT_PROMPTS[1]: " 51. To see this, multiply 17 by 3: ten times three is thirty, seven times three is "
                        "twenty-one, and the sum is fifty-one.",
    DEFAULT_PROMPTS[2]: "    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n"
                        "        if n % i == 0:\n            return False\n    return True\n",
    DEFAULT_PROMPTS[3]: "The ocean covers most of our planet and still hides creatures nobody has seen.",
}


def check(text: str) -> str | None:
    spec = QualitySpec()
    return reply_problem(text, min_distinct_ratio=spec.min_distinct_ratio, max_repeat_fraction=spec.max_repeat_fraction)


# ---------------------------------------------------------------- pure metrics


def test_units_split_words_symbols_and_cjk() -> None:
    assert text_units("Hello, world! x2") == ["Hello", ",", "world", "!", "x2"]
    assert text_units("长城很长") == ["长", "城", "很", "长"]
    assert text_units("  \n ") == []


def test_repeat_fraction_finds_loops_of_any_period() -> None:
    assert repeat_fraction("a a a a a a".split()) == 1.0
    assert repeat_fraction("x y z x y z x y z".split()) == 1.0
    assert repeat_fraction("intro words then a b a b a b".split()) == pytest.approx(6 / 9)
    assert repeat_fraction("1 , 2 , 3 , 4 , 5".split()) == 0.0  # a list is not a loop
    assert repeat_fraction("a b a b".split()) == 0.0  # twice is not yet a loop
    assert repeat_fraction([]) == 0.0


def test_good_replies_pass_and_degenerate_ones_are_named() -> None:
    for text in GOOD.values():
        assert check(text) is None, text
    assert check("") == "empty"
    assert check("   \n") == "empty"
    assert check("Paris.") is None  # too short to judge, but not empty
    assert check(" the" * 32) == "low_diversity"
    assert check("!!!!!!!!!!!!!!!!!!!!!!!!!!!!") == "low_diversity"
    loop = "Well, the short answer is: " + "we keep coming back to this very point, " * 3
    assert distinct_ratio(text_units(loop)) >= QualitySpec().min_distinct_ratio  # varied words ...
    assert check(loop) == "repetitive"  # ... but one phrase looping


def test_mean_input_logprob_reads_sglang_meta_info() -> None:
    meta = {"input_token_logprobs": [[None, 1, None], [-1.0, 2, None], [-3.0, 3, None]]}
    assert mean_input_logprob(meta) == (-2.0, 3)
    assert mean_input_logprob({}) == (None, 0)
    assert mean_input_logprob({"input_token_logprobs": [[None, 1, None]]}) == (None, 0)


# ---------------------------------------------------------------- settings


def test_spec_from_space_defaults_mapping_and_object() -> None:
    assert QualitySpec.from_space(SimpleNamespace()) == QualitySpec()
    spec = QualitySpec.from_space(SimpleNamespace(quality={"enabled": False, "max_new_tokens": 16,
                                                           "prompts": ["Say hi:"]}))
    assert (spec.enabled, spec.max_new_tokens, spec.prompts) == (False, 16, ("Say hi:",))
    obj = SimpleNamespace(quality=SimpleNamespace(enabled=True, max_logprob_drop=0.5, prompts=None))
    assert QualitySpec.from_space(obj).max_logprob_drop == 0.5
    assert QualitySpec.from_space(obj).prompts == DEFAULT_PROMPTS
    assert QualitySpec(prompts=("a",), check_logprobs=True).request_count() == 2


@pytest.mark.parametrize("raw, needle", [
    ({"enable": True}, "quality.enable: unknown key"),
    ({"enabled": "yes"}, "quality.enabled: must be true or false"),
    ({"max_new_tokens": 0}, "quality.max_new_tokens"),
    ({"min_distinct_ratio": 1.5}, "quality.min_distinct_ratio: must be within [0, 1]"),
    ({"prompts": "one prompt"}, "quality.prompts"),
    ({"timeout_s": 0}, "quality.timeout_s"),
    ({"reference_text": "too short"}, "quality.reference_text"),
])
def test_bad_settings_are_one_line_config_errors(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        QualitySpec.from_space(SimpleNamespace(quality=raw))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_fingerprint_changes_with_what_is_asked() -> None:
    assert QualitySpec().fingerprint() == QualitySpec(max_logprob_drop=1.0).fingerprint()
    assert QualitySpec().fingerprint() != QualitySpec(prompts=("x y",)).fingerprint()
    assert QualitySpec().fingerprint() != QualitySpec(max_new_tokens=8).fingerprint()


# ---------------------------------------------------------------- against a server


@dataclass
class Behaviour:
    replies: dict[str, str]
    logprob: float | None = -2.0  # mean logprob of the reference text; None: not supported
    status: int = 200
    delay_s: float = 0.0
    drop_connection: bool = False
    logprob_status: int = 200  # status of the reference-text (return_logprob) request


class FakeGenerate:
    """A /generate endpoint with scriptable replies, logprobs and faults."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                b = fake.behaviour
                time.sleep(b.delay_s)
                if b.drop_connection:
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.close()
                    return
                status = b.logprob_status if body.get("return_logprob") and b.status == 200 else b.status
                if status != 200:
                    self._send(status, {"error": "injected"})
                    return
                meta: dict[str, Any] = {"completion_tokens": 8}
                if body.get("return_logprob") and b.logprob is not None:
                    meta["input_token_logprobs"] = [[None, 0, None]] + [[b.logprob, i, None] for i in range(1, 40)]
                self._send(200, {"text": b.replies.get(body["text"], ""), "meta_info": meta})

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def fake() -> Iterator[FakeGenerate]:
    server = FakeGenerate(Behaviour(dict(GOOD)))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_good_server_passes_and_becomes_the_reference(fake: FakeGenerate) -> None:
    spec = QualitySpec()
    res = check_quality(fake.url, spec, headers={"Authorization": "Bearer k"})
    assert res.ok and res.message == "quality ok"
    assert res.logprob_mean == -2.0 and res.logprob_tokens == 40
    ref = res.as_reference()
    assert ref == {"fingerprint": spec.fingerprint(), "logprob_mean": -2.0, "logprob_tokens": 40,
                   "problems": [None, None, None, None]}
    gen = [r["body"] for r in fake.requests]
    assert [g["text"] for g in gen[:4]] == list(DEFAULT_PROMPTS)
    assert all(g["sampling_params"] == {"temperature": 0, "max_new_tokens": 32} and not g.get("stream") for g in gen[:4])
    assert gen[4]["return_logprob"] is True and gen[4]["logprob_start_len"] == 0
    assert {r["path"] for r in fake.requests} == {"/generate"} and fake.requests[0]["auth"] == "Bearer k"
    json.dumps(res.to_attr())  # storable as a user attr


def test_logprob_drop_against_the_reference_is_quality(fake: FakeGenerate) -> None:
    spec = QualitySpec()
    ref = check_quality(fake.url, spec).as_reference()
    fake.behaviour.logprob = -2.15  # within 0.2 nats/token
    assert check_quality(fake.url, spec, reference=ref).ok
    fake.behaviour.logprob = -2.6
    res = check_quality(fake.url, spec, reference=ref)
    assert res.reason == "quality" and "drop 0.600 > max_logprob_drop 0.2" in res.message
    assert res.reference_logprob_mean == -2.0
    # Another set of prompts: the old reference is not comparable and is ignored.
    other = QualitySpec(prompts=("Name a fruit:",))
    fake.behaviour.replies["Name a fruit:"] = " Apples are a common fruit."
    res = check_quality(fake.url, other, reference=ref)
    assert res.ok and any("reference ignored" in n for n in res.notes)


def test_degenerate_replies_fail_unless_the_baseline_did_the_same(fake: FakeGenerate) -> None:
    spec = QualitySpec()
    fake.behaviour.replies = {p: " again" * 32 for p in DEFAULT_PROMPTS}
    res = check_quality(fake.url, spec)
    assert res.reason == "quality" and "4 of 4 replies unusable" in res.message
    # One looping reply in four is tolerated (max_bad_fraction 0.25) ...
    fake.behaviour.replies = {**GOOD, DEFAULT_PROMPTS[2]: " again" * 32}
    assert check_quality(fake.url, spec).ok
    # ... two are not, unless the reference trial looped on the same prompts too.
    fake.behaviour.replies = {**GOOD, DEFAULT_PROMPTS[2]: " again" * 32, DEFAULT_PROMPTS[3]: ""}
    assert check_quality(fake.url, spec).reason == "quality"
    ref = {"fingerprint": spec.fingerprint(), "logprob_mean": -2.0, "logprob_tokens": 40,
           "problems": [None, None, "low_diversity", "empty"]}
    res = check_quality(fake.url, spec, reference=ref)
    assert res.ok and [r.excused for r in res.replies] == [False, False, True, True]


def test_server_without_logprobs_is_judged_on_text_only(fake: FakeGenerate) -> None:
    fake.behaviour.logprob = None
    res = check_quality(fake.url, QualitySpec(), reference={"fingerprint": QualitySpec().fingerprint(),
                                                           "logprob_mean": -2.0, "logprob_tokens": 40})
    assert res.ok and res.logprob_mean is None and any("logprobs unsupported" in n for n in res.notes)


def test_http_faults_map_to_stable_reasons(fake: FakeGenerate) -> None:
    spec = QualitySpec(timeout_s=0.5)
    fake.behaviour.status = 404  # no native API: the guard steps aside
    res = check_quality(fake.url, spec, server_alive=lambda: True)
    assert res.ok and res.skipped
    fake.behaviour.status = 500
    res = check_quality(fake.url, spec, server_alive=lambda: True)
    assert res.reason == "quality" and "HTTP 500" in res.message
    res = check_quality(fake.url, spec, server_alive=lambda: False)
    assert res.reason == "server_died"
    fake.behaviour.status, fake.behaviour.delay_s = 200, 1.5
    res = check_quality(fake.url, spec, server_alive=lambda: True)
    assert res.reason == "quality_timeout"
    fake.behaviour.delay_s, fake.behaviour.drop_connection = 0.0, True
    res = check_quality(fake.url, spec, server_alive=lambda: False)
    assert res.reason == "server_died"


def test_nothing_listening_and_dead_is_server_died() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = check_quality(f"http://127.0.0.1:{port}", QualitySpec(), server_alive=lambda: False)
    assert res.reason == "server_died" and "prompt 0" in res.message


def test_a_logprob_error_counts_only_if_the_reference_had_logprobs(fake: FakeGenerate) -> None:
    spec = QualitySpec()
    fake.behaviour.logprob_status = 500
    res = check_quality(fake.url, spec, server_alive=lambda: True)
    assert res.ok and res.logprob_mean is None and any("logprobs unsupported: HTTP 500" in n for n in res.notes)
    ref = {"fingerprint": spec.fingerprint(), "logprob_mean": -2.0, "logprob_tokens": 40, "problems": [None] * 4}
    res = check_quality(fake.url, spec, reference=ref, server_alive=lambda: True)
    assert res.reason == "quality" and "reference-text logprobs failed: HTTP 500" in res.message

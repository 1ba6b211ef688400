"""The OpenAI judge against a local, scripted OpenAI-compatible server (loopback only, no network)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evaluation.judges.base import ConsistencyCase, CorrectnessCase, Judge
from evaluation.judges.openai_judge import (
    PROMPT_VERSION,
    JudgeError,
    OpenAIJudge,
    consistency_prompt,
    correctness_prompt,
    parse_verdict,
)
from tests.helpers import openai_judge

SECRET = "sk-test-SECRET123"
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ("dog", "cat", "bird", "rain")


def _between(text: str, start: str, end: str = "\n>>>") -> str:
    i = text.index(start) + len(start)
    return text[i : text.index(end, i)]


def _picked(text: str, options: list[str]) -> set[str]:
    return {o for o in options if re.search(rf"\b{re.escape(o)}\b", text, re.IGNORECASE)}


def _decide(prompt: str) -> str:
    """The scripted judge: YES when the response names the reference (or the same options as the original)."""
    options = re.findall(r"\(\d+\) ([^;]+)", re.search(r"^Options: (.*)$", prompt, re.MULTILINE).group(1))
    if "Reference answer: " in prompt:
        truth = prompt.split("Reference answer: ", 1)[1].split("\n", 1)[0]
        response = _between(prompt, "Model's response:\n<<<\n")
        yes = _picked(response, options) == {truth}
    else:
        before = _between(prompt, "Original response:\n<<<\n")
        after = _between(prompt, "New response:\n<<<\n")
        yes = _picked(before, options) == _picked(after, options)
    return "VERDICT: YES" if yes else "**Verdict:** no"


class FakeOpenAI:
    """A ThreadingHTTPServer speaking just enough of POST /v1/chat/completions.

    `faults` is consumed one per request: "429", "500", "401", "timeout" (reply after the client
    gave up), "drop" (close the connection without a reply) or "garbage" (an unparsable reply).
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.retry_after = None  # a Retry-After header on 429s, when set
        self.faults: deque[str] = deque()
        # fault(prompt) -> a fault for that request or None: for faults by prompt, or at random
        self.rule = None
        self.answered: list[str] = []  # prompts answered with a 200 that the client received
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization", ""))
                    fault = server.faults.popleft() if server.faults else None
                    if fault is None and server.rule is not None:
                        fault = server.rule(body["messages"][-1]["content"])
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._reply(body, fault)
                except OSError:  # the client hung up (timeout, drop)
                    self.close_connection = True
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _reply(self, body: dict, fault: str | None) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no such route"}})
                time.sleep(server.delay)
                # retry-after-ms keeps the client's own backoff short in tests
                fast = {"retry-after-ms": "10"}
                if fault == "429":
                    err = {"message": "slow down", "type": "rate_limit_exceeded"}
                    wait = {"Retry-After": server.retry_after} if server.retry_after else fast
                    return self._send(429, {"error": err}, wait)
                if fault in ("500", "503"):
                    boom = {"error": {"message": "boom", "type": "server_error"}}
                    return self._send(int(fault), boom, fast)
                if fault == "400":
                    err = {"message": "this prompt is refused", "type": "invalid_request_error"}
                    return self._send(400, {"error": err})
                if fault == "nonjson":
                    data = b"<html>not json</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                if fault == "nochoices":  # JSON, but no chat completion's fields
                    return self._send(200, {"id": "chatcmpl-test", "object": "chat.completion"})
                if fault == "401":  # like the real API, the error echoes (part of) the key
                    err = {
                        "message": f"Incorrect API key provided: {SECRET}",
                        "type": "invalid_request_error",
                    }
                    return self._send(401, {"error": err})
                if fault == "timeout":
                    time.sleep(1.0)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                prompt = body["messages"][-1]["content"]
                text = "Probably yes, the answer is the dog." if fault == "garbage" else _decide(prompt)
                completion = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                }
                self._send(200, completion)
                if fault != "timeout":  # a reply after the client gave up is not received
                    with server.lock:
                        server.answered.append(body["messages"][-1]["content"])
                return None

        return Handler

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


@pytest.fixture
def make_judge(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    judges: list[OpenAIJudge] = []

    def make(**kw) -> OpenAIJudge:
        args = dict(base_url=server.url, cache_path=tmp_path / "cache" / "judge.sqlite", timeout_s=2.0)
        args.update(kw)
        judge = openai_judge(**args)
        judges.append(judge)
        return judge

    yield make
    for judge in judges:
        judge.close()


def q(text: str = "What animal makes this sound?") -> str:
    return f"{text} Options: {', '.join(OPTIONS)}."


def corr(truth: str, response: str, question: str | None = None) -> CorrectnessCase:
    return CorrectnessCase(question or q(), OPTIONS, truth, response)


def cons(before: str, after: str, question: str | None = None) -> ConsistencyCase:
    return ConsistencyCase(question or q(), OPTIONS, before, after)


def test_parse_verdict() -> None:
    for reply in [
        "VERDICT: YES",
        "verdict:yes",
        "  **VERDICT: YES**  ",
        "**Verdict:** Yes.",
        "VERDICT: YES\n",
    ]:
        assert parse_verdict(reply) is True, reply
    for reply in ["VERDICT: NO", "Verdict: no", "`VERDICT: NO`", "\nVERDICT:   NO\n\n"]:
        assert parse_verdict(reply) is False, reply
    for reply in [None, "", "YES", "VERDICT: YES\nVERDICT: NO", "VERDICT: maybe", "VERDICT: YES because dog"]:
        assert parse_verdict(reply) is None, reply
    assert parse_verdict("The response picks dog.\nVERDICT: YES") is None  # one line only


def test_prompts_carry_the_inputs() -> None:
    p = correctness_prompt(corr("cat", "It is a cat."))
    assert "(2) cat" in p and "Reference answer: cat" in p and "It is a cat." in p and "VERDICT: YES" in p
    p = consistency_prompt(cons("A dog.", "A bird."))
    assert "A dog." in p and "A bird." in p and "(4) rain" in p


def test_verdicts_for_a_batch_in_order(make_judge, server) -> None:
    judge = make_judge()
    assert isinstance(judge, Judge) and judge.name == "openai"
    cases = [
        corr("dog", "It sounds like a dog barking."),
        corr("cat", "That is a dog."),
        corr("bird", "I hear a bird, not a cat."),  # two options: not committed
        corr("rain", "Definitely rain falling."),
        corr("cat", "Meowing, so a cat."),
    ]
    out = judge.correctness(cases)
    assert [j.verdict for j in out] == [True, False, False, True, True]
    assert all(j.reason == "llm" for j in out)
    assert [j.committed for j in out] == ["dog", None, None, "rain", "cat"]
    out = judge.consistency(
        [cons("A dog.", "It is a dog barking."), cons("A dog.", "A cat."), cons("Rain.", "")]
    )
    assert [(j.verdict, j.reason) for j in out] == [(True, "llm"), (False, "llm"), (False, "empty")]
    assert server.count == 7

    body = server.bodies[0]
    assert body["model"] == "gpt-5-mini-2025-08-07"
    assert (
        body["seed"] == 0 and body["reasoning_effort"] == "minimal" and body["max_completion_tokens"] == 512
    )
    assert "temperature" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert set(server.auth) == {f"Bearer {SECRET}"}
    assert judge.stats() == dict(cases=8, shortcuts=1, cache_hits=0, calls=7, invalid=0)


def test_optional_request_fields(make_judge, server) -> None:
    judge = make_judge(reasoning_effort=None, seed=None, temperature=0.0, max_completion_tokens=None)
    judge.correctness([corr("dog", "a dog")])
    body = server.bodies[0]
    assert body["temperature"] == 0.0
    assert not {"reasoning_effort", "seed", "max_completion_tokens"} & set(body)


def test_shortcuts_make_no_calls(make_judge, server) -> None:
    judge = make_judge()
    out = judge.correctness(
        [corr("dog", ""), corr("dog", "  \n"), corr("dog", " Dog. "), corr("bird", '"bird"')]
    )
    assert [(j.verdict, j.reason) for j in out] == [
        (False, "empty"),
        (False, "empty"),
        (True, "shortcut"),
        (True, "shortcut"),
    ]
    assert out[2].committed == "dog"
    out = judge.consistency([cons("A dog.", "a dog"), cons("A dog.", " "), cons("", "A dog.")])
    assert [(j.verdict, j.reason) for j in out] == [(True, "shortcut"), (False, "empty"), (False, "empty")]
    assert server.count == 0
    assert judge.stats()["shortcuts"] == 7 and judge.stats()["calls"] == 0


def test_cache_is_shared_across_judges(make_judge, server, tmp_path) -> None:
    cases = [corr("dog", "a dog barks"), corr("cat", "a dog barks"), corr("dog", "a dog barks")]  # 3rd = 1st
    first = make_judge().correctness(cases)
    assert server.count == 2  # duplicates in a batch are asked once
    fresh = make_judge()  # a new object (as in another process) on the same file
    assert fresh.correctness(list(reversed(cases))) == list(reversed(first))
    assert fresh.consistency([cons("A dog.", "A cat.")])[0].verdict is False
    assert server.count == 3
    assert fresh.stats()["cache_hits"] == 3 and fresh.stats()["calls"] == 1
    assert (tmp_path / "cache" / "judge.sqlite").is_file()
    # another model is another judge: no hits
    make_judge(model="other-judge").correctness(cases[:1])
    assert server.count == 4


def test_no_cache_when_disabled(make_judge, server) -> None:
    make_judge(cache_path=None).correctness([corr("dog", "a dog barks")])
    make_judge(cache_path=None).correctness([corr("dog", "a dog barks")])
    assert server.count == 2


@pytest.mark.parametrize("fault", ["429", "500", "timeout", "drop"])
def test_transient_faults_are_retried_by_the_client(make_judge, server, fault) -> None:
    judge = make_judge(timeout_s=0.3)
    server.faults.extend([fault, fault])
    out = judge.correctness([corr("dog", "a dog barks")])
    assert out[0].verdict is True and out[0].reason == "llm"
    assert server.count == 3 and judge.stats()["calls"] == 3


def test_retry_after_is_honoured(make_judge, server) -> None:
    judge = make_judge()
    server.retry_after = "0.3"
    server.faults.append("429")
    start = time.monotonic()
    assert judge.correctness([corr("dog", "a dog barks")])[0].verdict is True
    assert time.monotonic() - start >= 0.3


def test_a_case_that_keeps_failing_is_invalid_and_the_run_goes_on(make_judge, server) -> None:
    judge = make_judge(max_retries=2, max_concurrency=1)
    server.faults.extend(["500"] * 3)  # the first case: every attempt fails
    out = judge.correctness([corr("dog", "a dog barks"), corr("cat", "a cat")])
    assert out[0].verdict is None and out[0].reason.startswith("invalid: HTTP 500")
    assert out[1].verdict is True and judge.stats()["invalid"] == 1
    assert server.count == 4


def test_setup_errors_stop_at_once(make_judge, server) -> None:
    judge = make_judge()
    server.faults.append("401")
    with pytest.raises(JudgeError) as err:
        judge.correctness([corr("dog", "a dog barks"), corr("cat", "a cat")])
    msg = str(err.value)
    assert "401" in msg and "OPENAI_API_KEY" in msg and "not retried" in msg
    assert SECRET not in "".join(traceback.format_exception(err.value))
    assert server.count <= 2  # no retries (the other case may have been in flight)


def test_a_200_that_is_not_json_is_an_invalid_case(make_judge, server) -> None:
    server.faults.append("nonjson")
    judge = make_judge(max_concurrency=1)
    out = judge.correctness([corr("dog", "a dog barks"), corr("cat", "a cat")])
    assert out[0].verdict is None and out[0].reason.startswith("invalid: unreadable reply")
    assert out[1].verdict is True


def test_a_reply_without_choices_is_an_invalid_case(make_judge, server) -> None:
    server.faults.append("nochoices")
    out = make_judge(max_concurrency=1).correctness([corr("dog", "a dog barks"), corr("cat", "a cat")])
    assert (
        out[0].verdict is None
        and out[0].reason == "invalid: unreadable reply (no choices list: ChatCompletion)"
    )
    assert out[1].verdict is True


@pytest.mark.parametrize("bug", [KeyError, TypeError, AttributeError, IndexError])
def test_a_bug_of_ours_raises_instead_of_counting_as_an_invalid_verdict(make_judge, server, bug) -> None:
    judge = make_judge(max_concurrency=1)

    def broken(prompt):
        raise bug("a bug in building the request")

    judge._request_kwargs = broken
    with pytest.raises(bug, match="a bug in building the request"):
        judge.correctness([corr("dog", "a dog barks")])
    assert server.count == 0


def test_a_flaky_server_and_a_refused_prompt(make_judge, server) -> None:
    """30% of calls get a 429, a 5xx or a stall past the timeout, one prompt always a 400: every
    other case is judged exactly once, the 400 is invalid with its reason, the totals add up."""
    import random

    rng = random.Random(0)
    lock = threading.Lock()

    def rule(prompt: str) -> str | None:
        if "POISON" in prompt:
            return "400"
        with lock:
            roll = rng.random()
        return rng.choice(["429", "500", "503", "timeout"]) if roll < 0.3 else None

    server.rule = rule
    judge = make_judge(timeout_s=0.4, max_retries=8, max_concurrency=4)
    cases = [corr(OPTIONS[i % 4], f"case {i}: a {OPTIONS[(i * 3) % 4]}") for i in range(24)]
    cases.append(corr("dog", "POISON: a dog"))
    out = judge.correctness(cases)
    assert out[-1].verdict is None and out[-1].reason.startswith("invalid: HTTP 400")
    expected = [OPTIONS[i % 4] == OPTIONS[(i * 3) % 4] for i in range(24)]
    assert [j.verdict for j in out[:-1]] == expected
    answered = [p for p in server.answered if "POISON" not in p]
    assert len(answered) == len(set(answered)) == 24  # each judged exactly once
    stats = judge.stats()
    assert stats["cases"] == 25 and stats["invalid"] == 1 and stats["calls"] == server.count
    again = make_judge(max_concurrency=4)
    server.rule = None
    before = server.count
    again.correctness(cases)
    assert server.count - before == 1  # a re-run asks exactly the invalid one


def test_unparsable_reply_is_invalid_and_not_cached(make_judge, server) -> None:
    server.faults.append("garbage")
    judge = make_judge(max_concurrency=1)
    out = judge.correctness([corr("dog", "a dog barks"), corr("cat", "a cat")])
    assert out[0].verdict is None and out[0].reason.startswith("invalid: unparsable") and not out[0].valid
    assert out[1].verdict is True
    assert judge.stats()["invalid"] == 1
    again = make_judge().correctness([corr("dog", "a dog barks"), corr("cat", "a cat")])
    assert [j.verdict for j in again] == [True, True]
    assert server.count == 3  # the invalid one was asked again, the other came from the cache


def test_api_key_never_leaks(make_judge, server, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    judge = make_judge()
    server.faults.extend(["429", "500", "garbage"])
    judge.correctness([corr(o, f"a {o}") for o in OPTIONS] + [corr("dog", "a cat")])
    judge.consistency([cons("A dog.", "A cat."), cons("Rain.", "It is rain.")])
    server.faults.append("401")
    with pytest.raises(JudgeError) as err:
        judge.correctness([corr("bird", "a bird sings")])
    assert server.count >= 10
    texts = [caplog.text, str(err.value), repr(err.value), repr(judge), str(judge.stats())]
    assert all(SECRET not in t for t in texts)
    files = list((tmp_path / "cache").iterdir())
    assert files and all(SECRET.encode() not in f.read_bytes() for f in files)


def test_missing_key_is_a_clear_error(monkeypatch, server, tmp_path) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        openai_judge(base_url=server.url, cache_path=None)
    monkeypatch.setenv("MY_JUDGE_KEY", "  ")
    with pytest.raises(JudgeError, match="MY_JUDGE_KEY"):
        openai_judge(base_url=server.url, api_key_env="MY_JUDGE_KEY")
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    judge = openai_judge(base_url=server.url, api_key_env="MY_JUDGE_KEY", cache_path=tmp_path / "c.sqlite")
    assert judge.correctness([corr("dog", "a dog")])[0].verdict is True
    assert server.auth == [f"Bearer {SECRET}"]
    judge.close()


def test_concurrency_is_bounded_and_order_kept(make_judge, server) -> None:
    server.delay = 0.15
    judge = make_judge(max_concurrency=3)
    cases = [corr(OPTIONS[i % 4], f"case {i}: a {OPTIONS[(i * 3) % 4]}") for i in range(12)]
    start = time.monotonic()
    out = judge.correctness(cases)
    elapsed = time.monotonic() - start
    assert [j.verdict for j in out] == [OPTIONS[i % 4] == OPTIONS[(i * 3) % 4] for i in range(12)]
    assert server.count == 12
    assert server.max_in_flight == 3
    assert elapsed < 12 * 0.15  # it did run concurrently


def test_hydra_config_instantiates(server, tmp_path, monkeypatch) -> None:
    from hydra.utils import instantiate

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cfg = OmegaConf.create(
        {"paths": {"root_dir": str(tmp_path)}, "judge": OmegaConf.load(ROOT / "configs/judge/openai.yaml")}
    )
    cfg.judge.connection.base_url = server.url
    judge = instantiate(cfg.judge)
    assert isinstance(judge, OpenAIJudge) and judge.name == cfg.judge.get("name") == "openai"
    r = judge.request
    assert r.model == "gpt-5-mini-2025-08-07" and r.reasoning_effort == "minimal" and r.seed == 0
    assert judge.cache_path == tmp_path / "outputs/cache/judge.sqlite" and judge.cache_path.is_file()
    key = judge._cache_key("correctness", "p")
    monkeypatch.setattr("evaluation.judges.openai_judge.PROMPT_VERSION", PROMPT_VERSION + "-next")
    assert judge._cache_key("correctness", "p") != key  # a new prompt version asks again
    judge.close()

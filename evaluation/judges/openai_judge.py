"""The paper's LLM judge: an OpenAI chat model (GPT-5 mini by default) asked for a YES/NO verdict.

Cases that need no model are decided locally, as in the paper: an empty response is wrong
(correctness) or inconsistent (consistency); a response that is the ground-truth option's text
is correct; a post-edit response that equals the pre-edit one is consistent. Everything else is
sent to the model through the `openai` client (any OpenAI-compatible server via `base_url`).

Decisions are cached in an SQLite file keyed by a sha256 of the judge settings (the server
included), the prompt version and the rendered prompt, so a re-run makes no calls for cases
already judged. Transient failures (429, 5xx, timeouts, dropped connections) are retried by the
openai client itself (`max_retries`, exponential backoff, Retry-After honoured). A case that
still fails, is refused (HTTP 400) or gets a reply that cannot be read comes back as
`Judgment(None, "invalid: <why>")`; the run goes on, and invalid verdicts are not cached, so a
re-run asks exactly those again. A bad key or an unknown model (401, 403, 404) stops the run
with a clear error. The API key is read from an environment variable only and is never stored,
logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai

from common.hparams import parse
from common.sqlite import connect_wal
from datamodules.options import normalize, option_letters, resolve_answer
from evaluation.judges.base import ConsistencyCase, CorrectnessCase, Judgment

log = logging.getLogger(__name__)

Case = TypeVar("Case", CorrectnessCase, ConsistencyCase)

PROMPT_VERSION = "sake-judge-v2"  # bump whenever a prompt or the parser changes: it keys the cache

_SYSTEM = (
    "You grade answers for a benchmark of questions about audio clips. You never hear the audio and "
    "must not guess what it contains: judge only the texts you are given. Your whole reply must be a "
    "single line, either `VERDICT: YES` or `VERDICT: NO`, with nothing before or after it."
)

_CORRECTNESS = """\
Does the model's response commit to the reference answer of this multiple-choice question?

Question, exactly as the model received it:
<<<
{question}
>>>
{options}Reference answer: {truth}

Model's response:
<<<
{response}
>>>

Say YES only when the response clearly picks the reference answer: the same option, possibly \
reworded, abbreviated, given as a synonym or surrounded by an explanation, and no other option \
alongside it. Say NO when it picks a different option, hedges between several options, refuses, \
says it cannot tell, or never settles on an answer.

Reply with one line only: VERDICT: YES or VERDICT: NO"""

_CONSISTENCY = """\
Do these two responses to the same multiple-choice question give the same answer?

Question, exactly as the model received it:
<<<
{question}
>>>
{options}
Original response:
<<<
{before}
>>>

New response:
<<<
{after}
>>>

Say YES when the new response settles on the same answer as the original one (wording, length \
and explanations may differ). Say NO when it settles on a different answer, or when one response \
commits to an answer and the other does not. When neither commits to an answer, say YES only if \
both say essentially the same thing.

Reply with one line only: VERDICT: YES or VERDICT: NO"""

_MARKUP = str.maketrans("", "", "*_`#>")
_VERDICT_LINE = re.compile(r"verdict\s*:\s*(yes|no)\s*\.?", re.IGNORECASE)
# Errors of the setup, not of one case: every other case would fail the same way.
_FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class JudgeError(RuntimeError):
    """The judge cannot work at all (no key, a bad key, an unknown model or route)."""


@dataclass
class JudgeCounters:
    """What the judge did, for the report. `invalid` counts cases left without a verdict."""

    cases: int = 0
    shortcuts: int = 0
    cache_hits: int = 0
    calls: int = 0  # HTTP requests made, the client's retries included
    invalid: int = 0


def parse_verdict(reply: str | None) -> bool | None:
    """YES -> True, NO -> False; None unless the reply holds exactly one kind of verdict line.

    Case, surrounding whitespace, markdown emphasis and a trailing full stop are tolerated;
    a reply with both a YES and a NO verdict, or with no `VERDICT:` line at all, is unparsable.
    """
    if not reply:
        return None
    found: set[str] = set()
    for line in reply.translate(_MARKUP).splitlines():
        line = line.strip()
        if not line:
            continue
        match = _VERDICT_LINE.fullmatch(line)
        if match is None:
            return None
        found.add(match.group(1).lower())
    return (found == {"yes"}) if len(found) == 1 else None


def _options_block(question: str, options: Sequence[str]) -> str:
    """The options as the question labels them: by letter "(A) ...", else numbered."""
    if not options:
        return ""
    letters = option_letters(question)
    labels = letters if len(letters) == len(options) else [str(i) for i in range(1, len(options) + 1)]
    return "Options: " + "; ".join(f"({k}) {o}" for k, o in zip(labels, options, strict=True)) + "\n"


def reference(case: CorrectnessCase) -> str:
    """The reference answer as the option it means, with the dataset's label when that differs
    (a label id such as `vocal_fry`, or a letter)."""
    option = resolve_answer(case.truth, case.options, case.question)
    truth = case.truth.strip()
    return truth if option is None or normalize(option) == normalize(truth) else f"{option} (label: {truth})"


def correctness_prompt(case: CorrectnessCase) -> str:
    """The user message for one correctness case."""
    return _CORRECTNESS.format(
        question=case.question.strip(),
        options=_options_block(case.question, case.options),
        truth=reference(case),
        response=case.response.strip(),
    )


def consistency_prompt(case: ConsistencyCase) -> str:
    """The user message for one consistency case."""
    return _CONSISTENCY.format(
        question=case.question.strip(),
        options=_options_block(case.question, case.options),
        before=case.before.strip(),
        after=case.after.strip(),
    )


@dataclass(frozen=True)
class JudgeRequest:
    """What each request asks, which decides the verdicts (and keys the verdict cache)."""

    model: str
    reasoning_effort: str | None  # None: not sent (non-reasoning models, servers that reject it)
    seed: int | None  # None: not sent
    temperature: float | None  # None: not sent (GPT-5 models accept only the default)
    max_completion_tokens: int | None  # room for the reasoning and the one-line verdict; None: not sent


@dataclass(frozen=True)
class Connection:
    """Where the requests go and how fast: nothing here changes a verdict but `base_url`."""

    base_url: str | None  # None: OPENAI_BASE_URL if set, else https://api.openai.com/v1
    api_key_env: str  # the environment variable holding the key (never a config)
    max_concurrency: int  # requests in flight at once
    max_retries: int  # the openai client's retries of transient failures
    timeout_s: float  # per request


class OpenAIJudge:
    """LLM judge over the OpenAI chat-completions API, with shortcuts, a cache, retries and a thread pool."""

    name = "openai"

    def __init__(
        self,
        name: str,
        request: JudgeRequest | Mapping,
        connection: Connection | Mapping,
        cache_path: str | os.PathLike[str] | None,
    ) -> None:
        """`request` and `connection` are the records or their plain data (configs/judge/openai.yaml)."""
        source = "configs/judge/openai.yaml"
        if not isinstance(request, JudgeRequest):
            request = parse(JudgeRequest, request, source, "judge.request")
        if not isinstance(connection, Connection):
            connection = parse(Connection, connection, source, "judge.connection")
        if connection.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {connection.max_concurrency}")
        if connection.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {connection.max_retries}")
        key = os.environ.get(connection.api_key_env, "").strip()
        if not key:
            env = connection.api_key_env
            raise JudgeError(
                f"judge=openai needs an API key in the environment variable {env}, which is unset or "
                f"empty. Export it (`export {env}=...`), or use judge=rule for the offline judge."
            )
        self.name = name
        self.request, self.connection = request, connection
        self.model = request.model
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.counters = JudgeCounters()
        self._lock = threading.Lock()
        # The client retries transient failures itself, with backoff and Retry-After; the hook
        # counts every request it makes.
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._count_call]})
        self._client = openai.OpenAI(
            api_key=key,
            base_url=connection.base_url,
            timeout=connection.timeout_s,
            max_retries=connection.max_retries,
            http_client=http,
        )
        self.base_url = str(self._client.base_url)
        if self.cache_path is not None:
            self._init_cache()

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, cache_path={self.cache_path!r})"
        )

    # ---------------------------------------------------------------- public API

    def identity(self) -> dict[str, object]:
        """The settings that decide a verdict; they key the verdict cache too."""
        return {
            "name": self.name,
            "model": self.model,
            "base_url": self.base_url,
            "prompt_version": PROMPT_VERSION,
            "reasoning_effort": self.request.reasoning_effort,
            "temperature": self.request.temperature,
            "seed": self.request.seed,
            "max_completion_tokens": self.request.max_completion_tokens,
        }

    def correctness(self, cases: Sequence[CorrectnessCase]) -> list[Judgment]:
        """One judgment per case, in order."""
        return self._judge("correctness", cases, self._correctness_shortcut, correctness_prompt)

    def consistency(self, cases: Sequence[ConsistencyCase]) -> list[Judgment]:
        """One judgment per case, in order."""
        return self._judge("consistency", cases, self._consistency_shortcut, consistency_prompt)

    def stats(self) -> dict[str, int]:
        """The counters as a plain dict (for the report)."""
        with self._lock:
            return asdict(self.counters)

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- shortcuts

    @staticmethod
    def _correctness_shortcut(case: CorrectnessCase) -> Judgment | None:
        if not case.response.strip():
            return Judgment(False, "empty")
        option = resolve_answer(case.truth, case.options, case.question) or case.truth
        if normalize(case.response) in {normalize(case.truth), normalize(option)}:
            return Judgment(True, "shortcut", committed=option)
        return None

    @staticmethod
    def _consistency_shortcut(case: ConsistencyCase) -> Judgment | None:
        if not case.after.strip() or not case.before.strip():
            return Judgment(False, "empty")
        if normalize(case.after) == normalize(case.before):
            return Judgment(True, "shortcut")
        return None

    # ---------------------------------------------------------------- batch logic

    def _judge(
        self,
        kind: str,
        cases: Sequence[Case],
        shortcut: Callable[[Case], Judgment | None],
        render: Callable[[Case], str],
    ) -> list[Judgment]:
        """Shortcuts first, then the cache, then the model for what is left; results in case order."""
        results: list[Judgment | None] = [None] * len(cases)
        pending: dict[str, tuple[str, list[int]]] = {}  # cache key -> (prompt, case indices)
        for i, case in enumerate(cases):
            decided = shortcut(case)
            if decided is not None:
                results[i] = decided
                continue
            prompt = render(case)
            key = self._cache_key(kind, prompt)
            pending.setdefault(key, (prompt, []))[1].append(i)
        n_shortcuts = len(cases) - sum(len(idx) for _, idx in pending.values())

        cached = self._cache_get(list(pending)) if pending else {}
        verdicts: dict[str, tuple[bool | None, str]] = {k: (v, "") for k, v in cached.items()}
        todo = {k: v[0] for k, v in pending.items() if k not in cached}
        with self._lock:
            self.counters.cases += len(cases)
            self.counters.shortcuts += n_shortcuts
            self.counters.cache_hits += sum(len(pending[k][1]) for k in cached)
        if todo:
            verdicts.update(self._ask_all(kind, todo))

        n_invalid = 0
        for key, (_, indices) in pending.items():
            verdict, problem = verdicts[key]
            if verdict is None:
                n_invalid += len(indices)
                judgment = Judgment(None, f"invalid: {problem}")
            else:
                first = cases[indices[0]]
                committed = first.truth if isinstance(first, CorrectnessCase) and verdict else None
                judgment = Judgment(verdict, "llm", committed=committed)
            for i in indices:
                results[i] = judgment
        with self._lock:
            self.counters.invalid += n_invalid
        log.info(
            "%s judge (%s): %d %s cases, %d shortcuts, %d cached, %d asked, %d invalid",
            self.name,
            self.model,
            len(cases),
            kind,
            n_shortcuts,
            len(pending) - len(todo),
            len(todo),
            n_invalid,
        )
        return [r for r in results if r is not None]

    def _count_call(self, _request: Any) -> None:
        with self._lock:
            self.counters.calls += 1

    def _ask_all(self, kind: str, todo: dict[str, str]) -> dict[str, tuple[bool | None, str]]:
        """(verdict, why it is missing) for every prompt, at most `max_concurrency` at a time. A
        setup error (JudgeError) stops the batch; any other failure leaves its case invalid."""
        out: dict[str, tuple[bool | None, str]] = {}
        pool = ThreadPoolExecutor(
            max_workers=min(self.connection.max_concurrency, len(todo)), thread_name_prefix="judge"
        )
        try:
            futures: dict[Future[tuple[bool | None, str]], str] = {
                pool.submit(self._ask_and_store, kind, key, prompt): key for key, prompt in todo.items()
            }
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                fut.result()  # re-raises a JudgeError; the rest are cancelled below
            for fut, key in futures.items():
                out[key] = fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out

    def _ask_and_store(self, kind: str, key: str, prompt: str) -> tuple[bool | None, str]:
        reply, problem = self._call(prompt)
        verdict = parse_verdict(reply) if reply is not None else None
        if verdict is None:
            problem = problem or f"unparsable reply {(reply or '')[:80]!r}"
            log.warning("%s judge: %s case left invalid (not cached): %s", self.name, kind, problem)
        else:
            self._cache_put(key, kind, verdict, reply or "")
        return verdict, problem

    # ---------------------------------------------------------------- one request

    def _request_kwargs(self, prompt: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt}],
        }
        r = self.request
        if r.seed is not None:
            kwargs["seed"] = r.seed
        if r.reasoning_effort is not None:
            kwargs["reasoning_effort"] = r.reasoning_effort
        if r.temperature is not None:
            kwargs["temperature"] = r.temperature
        if r.max_completion_tokens is not None:
            kwargs["max_completion_tokens"] = r.max_completion_tokens
        return kwargs

    def _call(self, prompt: str) -> tuple[str | None, str]:
        """(the reply's text or None, why there is none). The client has already retried what
        is worth retrying; a setup error raises JudgeError. Only the API's errors and replies
        without a text make a case invalid: anything else is a bug here and raises."""
        try:
            completion = self._client.chat.completions.create(**self._request_kwargs(prompt))
        except _FATAL as exc:
            raise JudgeError(
                f"{self.name} judge: {self.model} at {self.base_url} refused the request with HTTP "
                f"{exc.status_code} ({self._redact(exc.message)}); not retried"
                + (f" - check {self.connection.api_key_env}" if exc.status_code in (401, 403) else "")
            ) from None
        except openai.APIStatusError as exc:  # 400, 422, ... or 429/5xx after every retry
            return None, f"HTTP {exc.status_code}: {self._redact(exc.message)}"
        except openai.APIConnectionError as exc:  # timeouts and connection errors after every retry
            return None, f"{type(exc).__name__}: {self._redact(str(exc))}"
        except (openai.APIError, json.JSONDecodeError) as exc:  # a body that is no chat completion
            return None, f"unreadable reply ({type(exc).__name__}: {self._redact(str(exc))})"
        return reply_text(completion)

    def _redact(self, text: str, limit: int = 300) -> str:
        key = self._client.api_key
        if key:
            text = text.replace(key, "***")
        return text if len(text) <= limit else text[:limit] + "..."

    # ---------------------------------------------------------------- cache

    def _cache_key(self, kind: str, prompt: str) -> str:
        # Every setting that decides a verdict, the server included: two servers never share one.
        settings = {**self.identity(), "kind": kind, "system": _SYSTEM, "prompt": prompt}
        settings.pop("name")
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def _connect(self) -> sqlite3.Connection:
        assert self.cache_path is not None
        return connect_wal(self.cache_path)

    def _init_cache(self) -> None:
        assert self.cache_path is not None
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as con:
            with con:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, verdict INTEGER NOT NULL, "
                    "kind TEXT NOT NULL, model TEXT NOT NULL, reply TEXT NOT NULL, created REAL NOT NULL)"
                )

    def _cache_get(self, keys: list[str]) -> dict[str, bool]:
        if self.cache_path is None:
            return {}
        found: dict[str, bool] = {}
        with closing(self._connect()) as con:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = con.execute(
                    f"SELECT key, verdict FROM judgments WHERE key IN ({','.join('?' * len(chunk))})", chunk
                )
                found.update((k, bool(v)) for k, v in rows)
        return found

    def _cache_put(self, key: str, kind: str, verdict: bool, reply: str) -> None:
        if self.cache_path is None:
            return
        with closing(self._connect()) as con, con:
            con.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?)",
                (key, int(verdict), kind, self.model, reply, time.time()),
            )


def reply_text(completion: Any) -> tuple[str | None, str]:
    """(the first choice's text or None, why there is none) of what the server sent as a chat
    completion. The client builds replies without validating them, so a field the server left
    out is absent, not an error: each step is checked, and a reply without a text is invalid."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list):
        return None, f"unreadable reply (no choices list: {type(completion).__name__})"
    if not choices:
        return None, "unreadable reply (no choices)"
    choice = choices[0]
    text = getattr(getattr(choice, "message", None), "content", None)
    if not isinstance(text, str) or not text:
        return None, f"no text (finish_reason={getattr(choice, 'finish_reason', None)})"
    return text, ""

"""The unedited model's responses, generated once per model and query and kept on disk.

Every editor is scored against the same pre-edit responses, so they are generated in large
batches before a sweep and stored in SQLite, keyed by `LALM.answers_fingerprint()` (every
weight, the prompt rendering, the generation config as merged, detokenisation, the torch and
transformers versions) and the query as the model gets it: the rendered prompt, the content of
its audio (the file's bytes, not its name) and the generation length. Any editor's sweep on the
same model reuses them; a rebuilt or re-encoded clip is asked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from common.progress import progress_bar
from common.prompt import Prompt
from common.sqlite import connect_wal
from datamodules.examples import PromptMaker
from datamodules.schema import Query

log = logging.getLogger(__name__)


def response_key(rendered: str, audio: str | None, max_new_tokens: int) -> str:
    """The cache key of one query: its rendered prompt, its audio's digest, the length limit."""
    return hashlib.sha256(json.dumps([rendered, audio, max_new_tokens]).encode()).hexdigest()


class QueryKeys:
    """`response_key` of queries as `render` renders them, memoised per query."""

    def __init__(self, prompts: PromptMaker, render: Callable[[Prompt], str], max_new_tokens: int) -> None:
        self.prompts, self.render, self.max_new_tokens = prompts, render, max_new_tokens
        self._keys: dict[Query, str] = {}

    def __call__(self, q: Query) -> str:
        if q not in self._keys:
            rendered = self.render(Prompt(q.question, audio=_PLACEHOLDER if q.file else None))
            self._keys[q] = response_key(rendered, self.prompts.audio_digest(q), self.max_new_tokens)
        return self._keys[q]


# Rendering places one placeholder per clip whatever its samples: a stand-in renders the same.
_PLACEHOLDER = np.zeros(1600, dtype=np.float32)


class ResponseCache:
    """SQLite table (model, key) -> response. `path=None` keeps it in memory for this run only."""

    def __init__(self, path: str | Path | None, model: str) -> None:
        self.path, self.model = (str(path) if path else ":memory:"), model
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._memory = sqlite3.connect(":memory:") if not path else None
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(model TEXT, key TEXT, response TEXT, PRIMARY KEY (model, key))"
            )

    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            return self._memory
        return connect_wal(self.path)

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        db = self._connect()
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT key, response FROM responses WHERE model = ? AND key IN ({marks})",
                [self.model, *chunk],
            )
            found.update(rows.fetchall())
        if db is not self._memory:
            db.close()
        return found

    def put(self, items: dict[str, str]) -> None:
        db = self._connect()
        with db:
            db.executemany(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                [(self.model, k, v) for k, v in items.items()],
            )
        if db is not self._memory:
            db.close()

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()


def pre_edit_responses(
    queries: Sequence[Query],
    cache: ResponseCache,
    generate: Callable[[Sequence[Prompt]], list[str]],
    prompt: Callable[[Query], Prompt],
    key: Callable[[Query], str],
    batch_size: int,
) -> dict[str, str]:
    """Responses of the unedited model to `queries` ({key(q): response}); missing ones are
    generated in batches of `batch_size` and stored as each batch finishes.

    Batches hold queries of a kind: text-only ones together, then by question length, so that
    a batch pads its prompts (and waits for its longest answer) far less than one mixing a
    40-token text question with 180-token audio prompts: 27% faster on SAKE-mini's queries with
    the same answers (the order of the rows is all that changes; tests/test_generation_speed.py)."""
    by_key = {key(q): q for q in queries}
    have = cache.get(list(by_key))
    todo = sorted(
        ((k, q) for k, q in by_key.items() if k not in have),
        key=lambda kq: (kq[1].file is not None, len(kq[1].question)),
    )
    if not todo:
        return have
    log.info("pre-edit responses: %d cached, generating %d", len(have), len(todo))
    with progress_bar("pre-edit answers", len(todo), "queries") as advance:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            answers = generate([prompt(q) for _, q in chunk])
            new = {k: a for (k, _), a in zip(chunk, answers, strict=True)}
            cache.put(new)
            have.update(new)
            advance(len(chunk))
    return have

"""Spoken facts: factual prompts heard as speech, for locating and editing facts in LALMs
(the study of arXiv 2603.14343: CounterFact and Known-1000 prompts spoken by TTS).

    python -m datamodules.spoken_facts check MANIFEST.jsonl [--audio-root DIR] [--no-decode]
    python -m datamodules.spoken_facts build-mini --out DIR [--seed N] [--if-missing]

A manifest is JSON lines, one fact per line; audio paths are relative to an audio root (by
default the manifest's folder), word times in seconds from any aligner (or TTS word events):

    {"id": "cf-0042", "subject": "Veltran Osk", "relation": "native_language",
     "object": "German", "target": "Korean",                     target: absent for trace-only
     "prompt": {"text": "Veltran Osk's native language is", "audio": "audio/cf-0042.wav",
                "words": [{"word": "Veltran", "start": 0.04, "end": 0.41}, ...],
                "subject_words": [0, 1]},                        first and last subject word
     "paraphrases": [<prompt>, ...],                             same fact, other wording
     "neighbours": [{"subject": ..., "object": ..., "prompt": <prompt>}, ...]}
                                                                 other subjects, same relation

Known-1000-style facts carry no target, paraphrases or neighbours: they can be traced, not
edited. A bad record raises FactError naming the file, line and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.audio_io import AudioError, load_audio
from datamodules.schema import FieldReader, SchemaError, norm_label

ANCHORS = ("first_subject", "last_subject", "last_word")  # the word positions tracing groups by
AUDIO_SLACK_S = 0.05  # how far past the audio's end a word may end (aligners round)


class FactError(SchemaError):
    """A spoken-fact record that breaks the schema: file, line and field are in the message."""

    def __init__(self, source: str, line: int | None, field_: str, problem: str) -> None:
        super().__init__(f"{source}: line {line}" if line is not None else source, None, field_, problem)
        self.line = line


@dataclass(frozen=True)
class Word:
    """One spoken word of a prompt and where it is in the audio, in seconds."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class SpokenPrompt:
    """A prompt sentence as audio, with its words' times and the subject's word span."""

    text: str
    audio: str  # relative to the audio root
    words: tuple[Word, ...]
    subject: tuple[int, int]  # indices in `words` of the first and the last subject word

    def anchor(self, name: str) -> Word:
        """The word at an anchor of ANCHORS."""
        index = {"first_subject": self.subject[0], "last_subject": self.subject[1], "last_word": -1}
        if name not in index:
            raise ValueError(f"unknown anchor {name!r} (one of {', '.join(ANCHORS)})")
        return self.words[index[name]]

    @property
    def subject_span(self) -> tuple[float, float]:
        """(start, end) in seconds of the subject's words."""
        return self.words[self.subject[0]].start, self.words[self.subject[1]].end

    @property
    def duration_needed(self) -> float:
        return self.words[-1].end


@dataclass(frozen=True)
class Neighbour:
    """Another subject of the same relation, with its true object: an edit must leave it be."""

    subject: str
    object: str
    prompt: SpokenPrompt


@dataclass(frozen=True)
class SpokenFact:
    id: str
    subject: str
    relation: str
    object: str  # the true completion
    target: str | None  # the counterfactual one; None: the fact can be traced, not edited
    prompt: SpokenPrompt
    paraphrases: tuple[SpokenPrompt, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()
    source: str = ""
    line: int = 0

    @property
    def editable(self) -> bool:
        return self.target is not None

    def prompts(self) -> Iterator[SpokenPrompt]:
        yield self.prompt
        yield from self.paraphrases
        yield from (n.prompt for n in self.neighbours)


def _letters(text: str) -> str:
    """Text reduced to its letters and digits, casefolded: how subject and words are compared."""
    return re.sub(r"\W|_", "", text.casefold())


class _FactReader(FieldReader):
    def __init__(self, source: str, line: int) -> None:
        super().__init__(source, None)
        self.line = line

    def error(self, path: str, problem: str) -> FactError:
        return FactError(self.source, self.line, path, problem)

    def prompt(self, obj: Any, path: str, subject: str) -> SpokenPrompt:
        if obj is None:
            raise self.error(path, "missing")
        text = self.get(obj, "text", f"{path}.text")
        audio = self.get(obj, "audio", f"{path}.audio")
        raw_words = self.get(obj, "words", f"{path}.words", list)
        if not raw_words:
            raise self.error(f"{path}.words", "expected at least one word")
        words = []
        for i, w in enumerate(raw_words):
            here = f"{path}.words[{i}]"
            word = Word(
                self.get(w, "word", f"{here}.word"),
                float(self.get(w, "start", f"{here}.start", (int, float))),
                float(self.get(w, "end", f"{here}.end", (int, float))),
            )
            if not 0 <= word.start <= word.end:
                raise self.error(here, f"expected 0 <= start <= end, got {word.start} .. {word.end}")
            if words and word.start < words[-1].start:
                raise self.error(f"{here}.start", f"{word.start} is before the previous word's start")
            words.append(word)
        span = self.get(obj, "subject_words", f"{path}.subject_words", list)
        if len(span) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in span):
            raise self.error(
                f"{path}.subject_words", f"expected [first, last] word indices, got {span!r:.60}"
            )
        first, last = span
        if not 0 <= first <= last < len(words):
            raise self.error(f"{path}.subject_words", f"{span} is not a span of the {len(words)} words")
        # The span's words must spell the subject, the last one needed ("Osk's" for "... Osk").
        spelled = [_letters(w.text) for w in words[first : last + 1]]
        wanted = _letters(subject)
        if not "".join(spelled).startswith(wanted) or len("".join(spelled[:-1])) >= len(wanted):
            said = " ".join(w.text for w in words[first : last + 1])
            raise self.error(
                f"{path}.subject_words", f"words {span} say {said!r}, not the subject {subject!r}"
            )
        return SpokenPrompt(text, audio, tuple(words), (first, last))


def parse_fact(raw: Any, source: str, line: int) -> SpokenFact:
    """Validate one manifest record."""
    r = _FactReader(source, line)
    if not isinstance(raw, Mapping):
        raise r.error("<record>", f"expected an object, got {type(raw).__name__}")
    subject = r.get(raw, "subject", "subject")
    obj = r.get(raw, "object", "object")
    target = r.get(raw, "target", "target", optional=True)
    if target is not None and norm_label(target) == norm_label(obj):
        raise r.error("target", f"equals the object {obj!r}")
    paraphrases = r.get(raw, "paraphrases", "paraphrases", list, optional=True) or []
    neighbours = []
    for i, n in enumerate(r.get(raw, "neighbours", "neighbours", list, optional=True) or []):
        here = f"neighbours[{i}]"
        other = r.get(n, "subject", f"{here}.subject")
        if _letters(other) == _letters(subject):
            raise r.error(f"{here}.subject", f"is the fact's own subject {subject!r}")
        neighbours.append(
            Neighbour(
                other,
                r.get(n, "object", f"{here}.object"),
                r.prompt(n.get("prompt"), f"{here}.prompt", other),
            )
        )
    return SpokenFact(
        id=r.get(raw, "id", "id"),
        subject=subject,
        relation=r.get(raw, "relation", "relation"),
        object=obj,
        target=target,
        prompt=r.prompt(raw.get("prompt"), "prompt", subject),
        paraphrases=tuple(r.prompt(p, f"paraphrases[{i}]", subject) for i, p in enumerate(paraphrases)),
        neighbours=tuple(neighbours),
        source=source,
        line=line,
    )


def load_manifest(path: str | Path) -> list[SpokenFact]:
    """Every fact of a JSON-lines manifest (blank lines skipped); ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such spoken-facts manifest")
    facts, seen = [], {}
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise FactError(str(path), n, "<line>", f"not valid JSON ({err})") from err
        fact = parse_fact(raw, str(path), n)
        if fact.id in seen:
            raise FactError(str(path), n, "id", f"{fact.id!r} is already the id of line {seen[fact.id]}")
        seen[fact.id] = n
        facts.append(fact)
    return facts


def audio_problems(facts: list[SpokenFact], root: Path, decode: bool = True) -> tuple[int, list[str]]:
    """(distinct clips, problems): missing or unreadable clips and words past a clip's end."""
    clips: dict[str, list[tuple[SpokenFact, SpokenPrompt]]] = {}
    for fact in facts:
        for p in fact.prompts():
            clips.setdefault(p.audio, []).append((fact, p))
    problems = []
    for audio, uses in sorted(clips.items()):
        path = root / audio
        if not decode:
            if not path.is_file():
                problems.append(f"{path}: no such audio file")
            continue
        try:
            seconds = len(load_audio(path)) / 16000
        except AudioError as err:
            problems.append(str(err))
            continue
        for fact, p in uses:
            if p.duration_needed > seconds + AUDIO_SLACK_S:
                problems.append(
                    f"{fact.source}: line {fact.line}: {audio}: the words end at {p.duration_needed:.2f} s, "
                    f"the audio at {seconds:.2f} s"
                )
    return len(clips), problems


def check(
    manifest: str | Path, audio_root: str | Path | None = None, decode: bool = True, show: int = 5
) -> int:
    """Validate a manifest and print what it holds. Exit code: 2 for a record that breaks the
    schema, 1 for missing or unreadable audio, 0 otherwise."""
    try:
        facts = load_manifest(manifest)
    except (FactError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    relations = Counter(f.relation for f in facts)
    editable = [f for f in facts if f.editable]
    print(f"spoken facts in {manifest}: {len(facts)} ({len(editable)} with a target, editable)")
    print("  relations: " + ", ".join(f"{r} {n}" for r, n in sorted(relations.items())))
    print(
        f"  paraphrases {sum(len(f.paraphrases) for f in facts)}, neighbours "
        f"{sum(len(f.neighbours) for f in facts)}, one-word subjects "
        f"{sum(f.prompt.subject[0] == f.prompt.subject[1] for f in facts)}"
    )
    root = Path(audio_root) if audio_root is not None else Path(manifest).parent
    n, problems = audio_problems(facts, root, decode)
    print(f"audio under {root}: {n} clips, {len(problems)} problems")
    for p in problems[:show]:
        print(f"  {p}")
    return 1 if problems else 0


class SpokenFactsData:
    """Spoken facts as the entry points read them (configs/data/spoken_facts.yaml): the splits'
    manifests `<root>/<split>.jsonl`, their audio under `audio_root` (default: root), and the
    text instruction the model hears each prompt with. `build_mini`: build the offline world at
    `root` on first use (datamodules/mini/facts.py). `anchor`: the subject word an edit's keys
    are read at (EditRequest.span). `preserved`: the SAKE-format data whose train split is the
    speech corpus the locate-then-edit editors preserve (their key second moments) and draw
    neutral questions from: a SakeDataModule's settings (on the tiny model, SAKE-mini)."""

    def __init__(
        self,
        root: str,
        name: str,
        instruction: str,
        *,
        audio_root: str | None = None,
        build_mini: bool = False,
        mini_seed: int = 0,
        sampling_rate: int = 16000,
        max_facts: int | None = None,
        anchor: str = "first_subject",
        preserved: Mapping[str, Any] | None = None,
        trace_corruption: str = "audio_conv",  # read by configs/analysis/trace.yaml
    ) -> None:
        if anchor not in ANCHORS:
            raise ValueError(f"data.anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
        if max_facts is not None and max_facts < 1:
            raise ValueError(f"data.max_facts must be a positive number or null, got {max_facts}")
        self.root, self.name, self.instruction = Path(root), name, instruction
        self.audio_root = Path(audio_root) if audio_root else self.root
        self.build_mini, self.mini_seed = build_mini, mini_seed
        self.sampling_rate, self.max_facts = sampling_rate, max_facts
        self.anchor, self.preserved = anchor, dict(preserved or {})
        self.trace_corruption = trace_corruption
        self._preserved = None

    def prepare_data(self) -> None:
        if self.build_mini:
            from datamodules.mini.facts import ensure_facts

            ensure_facts(self.root, self.mini_seed)
        if self.preserved:
            self.preserved_data().prepare_data()

    def facts(self, split: str = "test") -> list[SpokenFact]:
        if split not in ("val", "test"):
            raise ValueError(f"spoken facts have the splits val and test, not {split!r}")
        facts = load_manifest(self.root / f"{split}.jsonl")
        if self.max_facts is None:
            return facts
        taken: Counter[str] = Counter()
        kept = []
        for fact in facts:  # the first max_facts of each relation, in data order
            if taken[fact.relation] < self.max_facts:
                kept.append(fact)
                taken[fact.relation] += 1
        return kept

    def prompt(self, spoken: SpokenPrompt, rate: int | None = None):
        """The model's prompt for a spoken prompt: the instruction with the clip."""
        from common.prompt import Prompt

        rate = rate or self.sampling_rate
        return Prompt(self.instruction, load_audio(self.audio_root / spoken.audio, rate), sampling_rate=rate)

    def request(self, fact: SpokenFact, rate: int | None = None, anchor: str | None = None):
        """The edit of `fact`: its prompt should now be completed with its target; the keys are
        read at the `anchor` word (default: data.anchor)."""
        from common import EditRequest

        if not fact.editable:
            raise ValueError(
                f"{fact.source}: line {fact.line}: fact {fact.id!r} has no target; it cannot be edited"
            )
        word = fact.prompt.anchor(anchor or self.anchor)
        return EditRequest(
            self.prompt(fact.prompt, rate), fact.target, fact.object, fact.relation, (word.start, word.end)
        )

    def preserved_data(self):
        """The SAKE-format data of `preserved` (a SakeDataModule), built once."""
        if not self.preserved:
            raise ValueError(
                "data.preserved is not set: the locate-then-edit editors need a speech corpus to "
                "preserve (a SAKE-format data config's settings, e.g. SAKE-mini's)"
            )
        if self._preserved is None:
            from datamodules.datamodule import SakeDataModule

            self._preserved = SakeDataModule(**self.preserved)
        return self._preserved

    def train_pool(self, sampling_rate: int):
        """What editors draw on (common.TrainPool): the preserved corpus's train split."""
        return self.preserved_data().train_pool(sampling_rate)

    def content_digest(self, facts: list[SpokenFact]) -> str:
        """A digest of the facts' records and of every clip they use: other data, another digest."""
        h = hashlib.sha256()
        for fact in facts:  # the record's content, not where it was read from
            record = {k: v for k, v in dataclasses.asdict(fact).items() if k not in ("source", "line")}
            h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        for audio in sorted({p.audio for f in facts for p in f.prompts()}):
            path = self.audio_root / audio
            h.update(f"{audio}:".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
        return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.spoken_facts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a spoken-facts manifest")
    c.add_argument("manifest", type=Path)
    c.add_argument("--audio-root", type=Path, default=None, help="default: the manifest's folder")
    c.add_argument("--no-decode", action="store_true", help="only look for the files")
    b = sub.add_parser("build-mini", help="build the offline spoken-facts world (espeak-ng)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--if-missing", action="store_true", help="do nothing where a build of this version is")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.manifest, args.audio_root, decode=not args.no_decode)
    from datamodules.mini.facts import build_facts, ensure_facts

    (ensure_facts if args.if_missing else build_facts)(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

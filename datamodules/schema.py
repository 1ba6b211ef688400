"""The SAKE JSON schema as typed records, with validation that names file, record and field.

One schema serves the real SAKE release, SAKE-mini and any split a user builds:

    {"file", "original_answer", "edited_answer", "reliability_question",
     "generality": [{file, question, answer} x3, types 1, 2, 3],
     "locality": {"audio": [{track, file, question, answer}, types 1, 2, 3, 4 (gender: 1, 3, 4)],
                  "text": [{question, answer, original_answer, subject}]},
     "portability": {"audio": {file, question, answer[, category]}},     (test only)
     "track": attribute name}                                             (val and sequential)

Questions about the four attributes, the text QA and portability carry their options as
"<question>\\n\\nOptions:\\n<opt1>\\n<opt2>..."; general-audio questions (Dynamic-SUPERB tasks,
audio locality type 4) state them in prose, or not readably at all (datamodules/options.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from datamodules.options import OPTIONS_MARK, parse_options, resolve_answer

ATTRIBUTES = ("gender", "emotion", "language", "animal")
# Query kinds judged against their answer; the others (locality) against the pre-edit response.
CORRECTNESS_KINDS = ("reliability", "generality", "portability")
# SAKE's label set per attribute (SAKE-mini uses the same ones).
SAKE_LABELS = {
    "gender": ("male", "female"),
    "emotion": ("happy", "disgust", "sad", "fear", "angry"),
    "language": ("english", "german", "spanish", "french", "italian", "chinese", "japanese", "korean"),
    "animal": ("dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow"),
}


class SchemaError(ValueError):
    """A record that does not follow the SAKE schema; the message names file, record and field."""

    def __init__(self, source: str, index: int | None, field_: str, problem: str) -> None:
        where = f"{source}: record {index}" if index is not None else source
        super().__init__(f"{where}: field '{field_}': {problem}")
        self.source, self.index, self.field = source, index, field_


def norm_label(label: str) -> str:
    """Labels compare case-insensitively ("Male" == "male")."""
    return label.strip().casefold()


def with_options(stem: str, options: tuple[str, ...] | list[str]) -> str:
    """A question in SAKE's option format."""
    return stem + OPTIONS_MARK + "\n".join(options)


def attribute_of(track: str) -> str | None:
    """'Animal' -> 'animal'; None for other tracks (e.g. DynamicSuperb/<Task>)."""
    t = track.strip().casefold()
    return t if t in ATTRIBUTES else None


@dataclass(frozen=True)
class Query:
    """One question the model is asked, with everything a judge needs."""

    kind: str  # reliability, generality, audio_locality, text_locality, portability
    question: str
    answer: str
    options: tuple[str, ...]
    file: str | None = None  # audio file name; None for text-only queries
    track: str | None = None  # folder of the audio: Animal, Emotion, ..., DynamicSuperb/<Task>
    type: int | None = None  # generality 1-3, audio locality 1-4
    category: str | None = None  # portability category or text-QA subject

    @property
    def name(self) -> str:
        return self.kind + (f"_{self.type}" if self.type else "")

    @property
    def truth(self) -> str | None:
        """The option the dataset's answer means (`answer` may be a label id such as
        `vocal_fry` or a letter), or None when it names none of the options."""
        return resolve_answer(self.answer, self.options, self.question)


@dataclass(frozen=True)
class EditInstance:
    """One SAKE edit with all its evaluation queries."""

    attribute: str
    file: str
    original: str
    target: str
    reliability: Query
    generality: tuple[Query, ...]
    audio_locality: tuple[Query, ...]
    text_locality: tuple[Query, ...]
    portability: tuple[Query, ...] = ()
    source: str = ""
    index: int = -1
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def track(self) -> str:
        return self.reliability.track or ""

    def queries(self) -> Iterator[Query]:
        yield self.reliability
        yield from self.generality
        yield from self.audio_locality
        yield from self.text_locality
        yield from self.portability


class FieldReader:
    """Field access on one raw record, raising SchemaError with the field's full path."""

    def __init__(self, source: str, index: int | None) -> None:
        self.source, self.index = source, index

    def error(self, path: str, problem: str) -> SchemaError:
        return SchemaError(self.source, self.index, path, problem)

    def get(self, obj: Any, key: str, path: str, kind: type | tuple[type, ...] = str, optional: bool = False):
        if not isinstance(obj, Mapping):
            raise self.error(path.rsplit(".", 1)[0] or path, f"expected an object, got {type(obj).__name__}")
        if key not in obj or obj[key] is None:
            if optional:
                return None
            raise self.error(path, "missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is str and not value.strip()):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(path, f"expected a non-empty {expected}, got {value!r:.60}")
        return value

    def query(self, obj: Any, path: str, kind: str, track: str | None, type_: int | None = None) -> Query:
        question = self.get(obj, "question", f"{path}.question")
        answer = self.get(obj, "answer", f"{path}.answer")
        file = self.get(obj, "file", f"{path}.file") if kind != "text_locality" else None
        options = parse_options(question)
        # A locality query needs no options (its pre- and post-edit answers are compared): a
        # general-audio task's prose may state none readably, and a few text-QA questions of the
        # real release lost theirs. Queries judged against their answer must list them.
        if not options and kind in CORRECTNESS_KINDS:
            raise self.error(f"{path}.question", "lists no options ('\\n\\nOptions:\\n<opt1>\\n...')")
        category = self.get(obj, "category", f"{path}.category", optional=True) or self.get(
            obj, "subject", f"{path}.subject", optional=True
        )
        return Query(kind, question, answer, options, file, track, type_, category)


def parse_instance(
    raw: Any, source: str, index: int, attribute: str | None = None, with_portability: bool | None = None
) -> EditInstance:
    """Validate one raw SAKE record. `attribute` comes from the file name or the record's `track`."""
    r = FieldReader(source, index)
    if not isinstance(raw, Mapping):
        raise r.error("<record>", f"expected an object, got {type(raw).__name__}")
    track = r.get(raw, "track", "track", optional=True)
    if track is not None:
        attribute = attribute_of(track)
        if attribute is None:
            raise r.error("track", f"{track!r} is not one of {[a.capitalize() for a in ATTRIBUTES]}")
    if attribute is None:
        raise r.error(
            "track", "missing: the file name does not name an attribute, so every record needs a track"
        )
    folder = attribute.capitalize()

    file = r.get(raw, "file", "file")
    original = r.get(raw, "original_answer", "original_answer")
    target = r.get(raw, "edited_answer", "edited_answer")
    if norm_label(original) == norm_label(target):
        raise r.error("edited_answer", f"equals original_answer {original!r}")
    rel_q = r.get(raw, "reliability_question", "reliability_question")
    reliability = r.query(
        {"file": file, "question": rel_q, "answer": target}, "reliability_question", "reliability", folder
    )

    gen = r.get(raw, "generality", "generality", list)
    if len(gen) != 3:
        raise r.error("generality", f"expected 3 entries (types 1, 2, 3), got {len(gen)}")
    generality = tuple(r.query(g, f"generality[{i}]", "generality", folder, i + 1) for i, g in enumerate(gen))

    loc = r.get(raw, "locality", "locality", Mapping)
    audio = r.get(loc, "audio", "locality.audio", list)
    types = (1, 3, 4) if attribute == "gender" else (1, 2, 3, 4)
    if len(audio) != len(types):
        raise r.error(
            "locality.audio",
            f"expected {len(types)} entries for {attribute} (types {types}), got {len(audio)}",
        )
    audio_locality = tuple(
        r.query(
            a, f"locality.audio[{i}]", "audio_locality", r.get(a, "track", f"locality.audio[{i}].track"), t
        )
        for i, (a, t) in enumerate(zip(audio, types, strict=True))
    )
    text = r.get(loc, "text", "locality.text", list)
    if not text:
        raise r.error("locality.text", "expected at least one entry")
    text_locality = tuple(
        r.query(t, f"locality.text[{i}]", "text_locality", None) for i, t in enumerate(text)
    )

    portability: tuple[Query, ...] = ()
    port = r.get(raw, "portability", "portability", Mapping, optional=not with_portability)
    if port is not None:
        p = r.get(port, "audio", "portability.audio", Mapping)
        portability = (r.query(p, "portability.audio", "portability", folder),)
    return EditInstance(
        attribute, file, original, target, reliability, generality, audio_locality, text_locality,
        portability, source, index, raw,
    )  # fmt: skip


def instance_to_json(inst: EditInstance) -> dict[str, Any]:
    """The SAKE JSON record of an instance (inverse of parse_instance)."""
    rec: dict[str, Any] = {
        "file": inst.file,
        "original_answer": inst.original,
        "edited_answer": inst.target,
        "reliability_question": inst.reliability.question,
        "generality": [{"file": q.file, "question": q.question, "answer": q.answer} for q in inst.generality],
        "locality": {
            "audio": [
                {"track": q.track, "file": q.file, "question": q.question, "answer": q.answer}
                for q in inst.audio_locality
            ],
            "text": [
                {
                    "question": q.question,
                    "answer": q.answer,
                    "original_answer": q.options.index(q.truth) if q.truth in q.options else None,
                    "subject": q.category,
                }
                for q in inst.text_locality
            ],
        },
    }
    if inst.portability:
        p = inst.portability[0]
        rec["portability"] = {
            "audio": {"file": p.file, "question": p.question, "answer": p.answer, "category": p.category}
        }
    return rec

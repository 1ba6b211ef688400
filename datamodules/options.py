"""The answer options a SAKE question states, and which option a dataset answer means.

SAKE's attribute questions (and its text QA and portability questions) list their options in
one format, "<question>\\n\\nOptions:\\n<opt1>\\n<opt2>...". Its general-audio questions (audio
locality type 4, from Dynamic-SUPERB) state them in prose, in many phrasings:

    The answer could be one, two, three, four, or five.
    Possible genres are one of the following: classical, electronic, jazz, metal, pop.
    Is it belt, vibrato, lip trill, ..., or inhaled?
    Determine the stroke in the recording as 'dhin', 'cha', ..., or 'thi'.
    ... four categories: Teenager (below 20), Young adult (20-39), ... and Elderly adult (60+).
    ... choose the most appropriate response from the four options. (A) ... (B) ... (D) ...
    ... stop and on. If the word is not in the list, respond with <unknown>; ...

`parse_options` reads these with general rules about how English enumerates choices, not with
a table per task:
1. the "Options:" block;
2. lettered options "(A) ... (B) ..." (their letters are `option_letters`);
3. otherwise the longest enumeration "X, Y, or Z" / "X, Y and Z" / "X, Y, Z" in one sentence,
   starting after the last cue that introduces it (a colon or dash, "could be", "are",
   "include", "from", "as", "like", "is it", ...), with surrounding quotes and a leading article
   dropped, and a head noun shared by adjectives ("an acoustic, electronic, or synthetic
   instrument") moved off the last item; plus the replies an instruction adds ("respond with
   <unknown>").
A question none of these read keeps no options; it is still a valid query (locality compares
pre- and post-edit answers, which needs no options).

Dataset answers are sometimes label ids rather than the wording of an option (`vocal_fry` for
"vocal fry", `elderly_adult` for "Elderly adult (60+)", `C` for "(C) Hold on ...", `crying` for
"cry"); `resolve_answer` maps an answer onto the option it means, or None when none fits.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

OPTIONS_MARK = "\n\nOptions:\n"

# A letter marker "(A)" at the start of the text, a line, or after a space.
_LETTER = re.compile(r"(?:^|(?<=\s))\(([A-Z])\)\s*")
# Sentence ends: . ! ? ; followed by a space or the end ("0.4m" and "e.g." mid-word stay).
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
# Dashes that set off an enumeration ("category—Bangu, Naobo, Daluo, or Xiaoluo—this audio").
_DASH = re.compile(r"\s*[\u2014\u2013]\s*|\s+-\s+")
# Words after which an enumeration starts; the last one before the first item counts.
_CUES = frozenset(
    "be are is were as include includes including from like among within between either of to "
    "into in by under it following whether choose select pick "
    # nouns that name the set being enumerated ("the available genres newwave, rnb, ...")
    "options option list choices categories labels types classes genres instruments sounds".split()
)
# Words of a clause, not of an option: "..., and note that multiple answers may be correct".
_CLAUSE = frozenset("that may might can could should will would is are there you which".split())
_DETERMINERS = frozenset("this that these those its their his her my your our".split())
# Instructions that add a reply of their own ("respond with <unknown>").
_EXTRA_REPLY = re.compile(
    r"\b(?:respond|reply|answer|output)\s+(?:with\s+)?(<[^<>\s]{1,30}>|'[^']{1,30}'|\"[^\"]{1,30}\")",
    re.IGNORECASE,
)
_QUOTES = "'\"\u2018\u2019\u201c\u201d`"
_EDGE = string.whitespace + string.punctuation.replace("<", "").replace(">", "").replace("#", "")
# An item longer than this (in words) is prose, not an option.
MAX_OPTION_WORDS = 6


def option_letters(question: str) -> tuple[str, ...]:
    """The letters of lettered options "(A) ... (B) ...", in order; () when it has none."""
    letters = [m.group(1) for m in _LETTER.finditer(question)]
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    return tuple(letters) if len(letters) >= 2 and letters == expected else ()


def _lettered(question: str) -> tuple[str, ...]:
    if not option_letters(question):
        return ()
    marks = list(_LETTER.finditer(question))
    ends = [m.start() for m in marks[1:]] + [len(question)]
    texts = [question[m.end() : end].strip() for m, end in zip(marks, ends, strict=True)]
    # Text after the last option that is not part of it (a note on its own line).
    texts[-1] = texts[-1].split("\n")[0].strip()
    return tuple(texts)


def _words(text: str) -> list[str]:
    return text.split()


def _split_commas(text: str) -> list[str]:
    """`text` split at commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")" and depth > 0
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in [*parts, text[start:]]]


def _strip_item(item: str) -> str:
    item = item.strip().strip(_QUOTES).strip()
    return item.rstrip(".?!:;").strip().strip(_QUOTES).strip()


def _bare(item: str) -> str:
    """An item without its parentheticals ("Teenager (13 to 19 years old)" -> "Teenager")."""
    return re.sub(r"\s*\([^()]*\)", "", item).strip()


def _after_cue(part: str) -> tuple[str, bool] | None:
    """(the text after the last cue word of `part`, whether an article opened it), or None
    when `part` has no cue."""
    words = _words(_bare(part))
    cut = None
    for i, w in enumerate(words):
        if w.casefold().strip(_QUOTES + ",") in _CUES:
            cut = i + 1
    if cut is None or cut == len(words):
        return None
    item = words[cut:]
    # After the last article, if one opens the item's last words ("produced by a synth_lead").
    for j in range(len(item) - 2, -1, -1):
        if item[j].casefold() in ("a", "an", "the"):
            return " ".join(item[j + 1 :]), True
    return " ".join(item), False


def _items(sentence: str) -> list[str]:
    """The options of one sentence's enumeration ("X, Y, or Z"), or [] when it has none."""
    # A colon or dash opens the list: the part after the last one that holds a list.
    for sep in (_DASH, re.compile(r":\s*")):
        pieces = sep.split(sentence)
        listing = [p for p in pieces if "," in p or re.search(r"\s(?:or|and)\s", p)]
        if listing and len(pieces) > 1:
            sentence = listing[-1]
    parts = [p for p in _split_commas(sentence) if p]
    if not parts:
        return []
    # The last item follows the conjunction: "..., or Z", "... stop and on", "X or Y".
    last = parts[-1]
    m = re.match(r"(?:or|and)\s+(.*)$", last, re.IGNORECASE | re.DOTALL)
    conjunction = m is not None
    if m:
        parts[-1] = m.group(1)
    elif len(parts) >= 3 and len(_words(_bare(last))) > MAX_OPTION_WORDS:
        parts = parts[:-1]  # prose after the list: "..., hard, select one or more genres that ..."
    else:
        halves = re.split(r"\s+(?:or|and)\s+", last, maxsplit=1)
        if len(halves) == 2 and len(_words(halves[0])) <= MAX_OPTION_WORDS:
            parts[-1:] = halves
            conjunction = True
    if len(parts) < 2:
        return []
    # Walk back from the end while the parts look like options; a part with a cue word holds
    # the first option after its cue.
    items: list[str] = [parts[-1]]
    article, cued = False, False
    for part in reversed(parts[:-1]):
        after = _after_cue(part)
        if after is not None:
            items.insert(0, after[0])
            article, cued = after[1], True
            break
        if len(_words(_bare(part))) > MAX_OPTION_WORDS:
            break
        items.insert(0, part)
    items = [_strip_item(i) for i in items]
    if len(items) < 2:
        return []
    lengths = sorted(len(_words(_bare(i))) for i in items[1:-1]) or [1]
    typical = lengths[len(lengths) // 2]
    first = _words(_bare(items[0]))
    # "Based on the list 90s", "Is this sound acoustic": the item is at the end of the part.
    if len(first) > typical + 1 and (not cued or first[0].casefold() in _DETERMINERS):
        items[0] = " ".join(first[-typical:])
    longest = max(len(_words(_bare(i))) for i in items[:-1])
    if len(_words(_bare(items[-1]))) > longest + 1:
        clause = any(w.casefold() in _CLAUSE for w in _words(items[-1]))
        if (clause or not conjunction) and len(items) >= 3:
            items = items[:-1]  # "..., hard, select the genre(s) that apply": prose after the list
        else:
            items[-1] = " ".join(_words(items[-1])[:longest])  # "or Z based on the audio"
    if article and all(len(_words(i)) == 1 for i in items[:-1]) and len(_words(items[-1])) == 2:
        items[-1] = _words(items[-1])[0]  # "an acoustic, electronic, or synthetic instrument"
    items = [i for i in items if i]
    return items if len(items) >= 2 else []


def parse_options(question: str) -> tuple[str, ...]:
    """The answer options a question states, in order; () when it states none readably."""
    if OPTIONS_MARK in question:
        tail = question.split(OPTIONS_MARK, 1)[1]
        return tuple(line.strip() for line in tail.splitlines() if line.strip())
    lettered = _lettered(question)
    if lettered:
        return lettered
    best: list[str] = []
    for sentence in _SENTENCE_END.split(question):
        found = _items(sentence.strip())
        if len(found) >= max(2, len(best)):  # the longest; on ties the later one
            best = found
    if not best:
        return ()
    extra = [m.group(1).strip(_QUOTES) for m in _EXTRA_REPLY.finditer(question)]
    options: dict[str, str] = {}  # the first of duplicates, in order
    for option in [*best, *extra]:
        options.setdefault(normalize(option), option)
    return tuple(options.values())


def normalize(text: str) -> str:
    """Casefold, collapse whitespace, strip surrounding punctuation and quotes."""
    return " ".join(text.casefold().split()).strip(_EDGE)


def _label_form(text: str) -> str:
    """A label id's words: "vocal_fry" -> "vocal fry", "Middle-aged adult (40-59)" ->
    "middle aged adult"."""
    text = re.sub(r"\s*\([^()]*\)\s*", " ", text)
    return " ".join(re.sub(r"[_\-]+", " ", normalize(text)).split())


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def resolve_answer(answer: str, options: Sequence[str], question: str = "") -> str | None:
    """The option (exactly as written in `options`) that a dataset answer means, or None.

    In order: the option's text (case and surrounding punctuation aside); its label form
    (underscores and hyphens as spaces, parentheticals dropped: `elderly_adult`); the option
    with that letter in a lettered question (`C`); the one option whose words the answer's
    stems match (`crying` for "cry") or contain (`healthy` for "healthy voice")."""
    if not options:
        return None
    target = normalize(answer)
    for option in options:
        if normalize(option) == target:
            return option
    label = _label_form(answer)
    for option in options:
        if _label_form(option) == label:
            return option
    letters = option_letters(question) if question else ()
    if letters and len(options) == len(letters):
        letter = target.strip("()").upper()
        if letter in letters:
            return options[letters.index(letter)]
    stems = [_stem(w) for w in label.split()]
    if not stems:
        return None
    same = [o for o in options if [_stem(w) for w in _label_form(o).split()] == stems]
    if len(same) == 1:
        return same[0]
    within = [o for o in options if set(stems) <= {_stem(w) for w in _label_form(o).split()}]
    return within[0] if len(within) == 1 else None

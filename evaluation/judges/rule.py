"""The offline rule judge: which option, if any, a free-text response commits to.

`commit` reads a response the way a careful grader would, without a model:

1. empty or degenerate (looping) output commits to nothing;
2. a response that *is* an option (case, whitespace, surrounding punctuation and quotes aside)
   commits to it;
3. otherwise the options are searched for as words: each option's words, lemmatised
   (plurals, a few inflections and synonyms such as anger -> angry, fearful -> fear,
   woman -> female, "4" -> four) must appear in a row; an option of several content words is
   also found by most of its *distinctive* words (those no other option has), near each other;
4. a mention inside the scope of a negation ("not angry, sad or disgusted", "unlike a cat",
   "rather than a dog") is a rejection, not a commitment;
5. if exactly one option is mentioned and not rejected, the response commits to it; if several
   are, an explicit statement decides ("the answer is X", "Answer: X", "it is X", "sounds X"),
   unless it hedges ("X or Y"); failing that, an option that opens the response ("Dog. ...");
   otherwise the response commits to nothing.

The judge never abstains: every Judgment has a boolean verdict and says in `reason` how it
was reached.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from types import MappingProxyType
from typing import NamedTuple

from datamodules.options import normalize, option_letters, resolve_answer
from evaluation.degeneration import is_degenerate
from evaluation.judges.base import ConsistencyCase, CorrectnessCase, Judgment

# Numbers with their separators and unit ("2,000", "0.4m"), words (with their combining
# diacritics, "l̪" is not "l"; with inner apostrophes: "it's", "isn't"), the punctuation that
# structures a sentence, and line breaks (a bullet list's items are sentences of their own).
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"  # combining diacritics
_TOKEN = re.compile(rf"\d+(?:[.,]\d+)*[^\W\d_]*|[^\W_](?:[^\W_]|[{_MARKS}])*(?:'[^\W_]+)*|[.!?;:,/]|\n")
_CLAUSE_END = frozenset(".!?;:\n")
_SENTENCE_END = frozenset(".!?;\n")
_ANSWER_ADJECTIVES = frozenset({"correct", "right", "best", "final", "most", "likely", "appropriate", "only"})
# A subject that judges ("the most appropriate expression", "the correct statement about X").
_JUDGING = frozenset({"correct", "right", "best", "most", "appropriate", "accurate", "true", "suitable"})
_PUNCTUATION = _CLAUSE_END | {",", "/"}
_ARTICLES = frozenset({"a", "an", "the"})
# "'s" is dropped from possessives ("dog's" -> "dog") but kept in these contractions.
_CONTRACTIONS = frozenset(
    {"it's", "that's", "he's", "she's", "there's", "here's", "what's", "who's", "let's", "where's"}
)
# Set phrases that would otherwise read as an option ("I'm afraid" is not fear).
_IDIOMS = (
    (re.compile(r"\b(i'm|i am|im)\s+afraid\b"), r"\1 sorry"),
    (re.compile(r"\bhappy to (help|assist|answer)\b"), r"glad to \1"),
)

# Inflections and synonyms mapped onto one lemma (applied to options and responses alike).
_VARIANTS = (
    ("angry", ("anger", "angered", "angrily", "furious")),
    ("happy", ("happiness", "happier", "happiest", "joyful", "cheerful")),
    ("sad", ("sadness", "sadder", "saddest", "saddened", "sorrowful")),
    ("disgust", ("disgusted", "disgusting", "disgustingly")),
    ("fear", ("fearful", "fearfully", "feared", "frightened", "scared", "afraid", "terrified")),
    ("surprise", ("surprised", "surprising")),
    ("neutral", ("neutrality",)),
    ("male", ("man", "men", "boy", "gentleman", "gentlemen", "guy", "masculine")),
    ("female", ("woman", "women", "girl", "lady", "feminine")),
    ("chinese", ("mandarin",)),
    ("dog", ("puppy", "puppies")),
    ("cat", ("kitten", "kitty")),
    ("pig", ("piglet",)),
)
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_CANON = MappingProxyType(
    {variant: lemma for lemma, variants in _VARIANTS for variant in variants}
    | {str(number): word for number, word in enumerate(_NUMBER_WORDS)}
)

# Words that never make an option distinctive.
_STOPWORDS = frozenset(
    "a an the of in on at by for to with from into onto over under and or but is are was were be "
    "been being am do does did has have had it its it's this that these those there their his her "
    "he she they them someone something somebody who whom which what when where while some any "
    "very so as one".split()
)

# Negation. Verbal negators may be followed by a lead-in before what they negate ("don't think
# it's a dog"); the others negate what follows at once ("no dog", "unlike a cat", "than a cat").
_VERBAL_NEGATORS = frozenset(
    {"not", "never", "cannot", "dont", "doesnt", "isnt", "arent", "wasnt", "didnt", "cant", "couldnt"}
)
_NOMINAL_NEGATORS = frozenset(
    {"no", "neither", "nor", "none", "without", "unlike", "than", "except", "excluding", "non"}
)
_LEAD_IN = frozenset(
    "think believe sure say said a an the that it it's is be really necessarily exactly quite "
    "definitely likely probably sound sounds seem seems like to of appear appears just at all very "
    "too hear heard".split()
)
# Words that end a negation's scope: a new clause or a contrast begins.
_SCOPE_END = frozenset(
    "but however rather instead it it's its this that that's which who is are was were so therefore "
    "thus hence because since as while whereas more i i'm i'd he she he's she's they they're yes "
    "actually only if when unless where whether although though after before until".split()
)
# Words that may sit inside a negated list without ending it ("not angry, sad or disgusted").
_CONNECTORS = frozenset({",", "/", "or", "and", "nor", "a", "an", "the", "either", "even"})
# Beyond mentions and connectors, a negation's scope covers at most this many other words.
_SCOPE_FREE_WORDS = 2

# Hedges: mentions of different options joined by these words form a list ("dog or cat").
_LIST_JOINERS = _CONNECTORS | {"maybe", "perhaps", "possibly", "probably"}
_CONJUNCTIONS = frozenset({"or", "and", "nor", "/"})

# Explicit commitments: an option preceded (fillers aside) by one of these word sequences.
_MARKERS = (
    ("is",),
    ("it's",),
    ("that's",),
    ("was",),
    ("answer",),
    ("answer", ":"),
    ("would", "be"),
    ("should", "be"),
    ("must", "be"),
    ("will", "be"),
    ("to", "be"),
    ("say",),
    ("choose",),
    ("select",),
    ("pick",),
    ("sounds",),
    ("seems",),
    ("speaks",),
    ("speaking",),
)
_MARKER_FILLERS = frozenset(
    "a an the probably likely most more definitely clearly certainly surely indeed actually really "
    "very from of by made produced like just simply quite in".split()
)


class _Pattern(NamedTuple):
    """How one option is looked for in a response."""

    phrase: tuple[str, ...]  # its lemmas, leading article dropped, to be found in a row
    distinctive: frozenset[str]  # stems only it has; empty when only `phrase` is used
    required: int  # how many distinctive stems a mention needs


class _Mention(NamedTuple):
    option: int
    start: int
    end: int  # exclusive
    phrase: bool  # found as a whole phrase (not by distinctive words)


def _tokens(text: str) -> list[str]:
    text = text.casefold().replace("\u2019", "'").replace("\u2018", "'")
    for pattern, replacement in _IDIOMS:
        text = pattern.sub(replacement, text)
    out = []
    for token in _TOKEN.findall(text):
        if token.endswith("'s") and token not in _CONTRACTIONS:
            token = token[:-2]
        out.append(token)
    return out


def _singular(word: str) -> str:
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _lemma(word: str) -> str:
    if word in _CANON:
        return _CANON[word]
    base = _singular(word)
    return _CANON.get(base, base)


def _stem(lemma: str) -> str:
    """A crude stem for distinctive-word matching: cheated/cheating -> cheat, loved -> lov."""
    for suffix in ("ing", "ed", "er"):
        if lemma.endswith(suffix) and len(lemma) - len(suffix) >= 3:
            lemma = lemma[: -len(suffix)]
            if lemma[-1] == lemma[-2] and lemma[-1] not in "aeiouls":
                lemma = lemma[:-1]
            break
    if len(lemma) > 3 and lemma.endswith("e"):
        lemma = lemma[:-1]
    return lemma


def _patterns(options: Sequence[str]) -> list[_Pattern]:
    phrases = []
    for option in options:
        lemmas = [_lemma(t) for t in _tokens(option) if t not in _PUNCTUATION]
        while len(lemmas) > 1 and lemmas[0] in _ARTICLES:
            lemmas.pop(0)
        phrases.append(tuple(lemmas))
    content = [{_stem(w) for w in p if w not in _STOPWORDS} for p in phrases]
    patterns = []
    for i, phrase in enumerate(phrases):
        distinctive: frozenset[str] = frozenset()
        if len(content[i]) >= 2:
            others = set().union(*(c for j, c in enumerate(content) if j != i))
            # words, not numbers or letters: "2" alone does not name "2,000 s"
            distinctive = frozenset(
                w for w in content[i] - others if w.isalpha() and len(w) >= 3 and w not in _NUMBER_WORDS
            )
        k = len(distinctive)
        patterns.append(_Pattern(phrase, distinctive, k if k <= 2 else math.ceil(2 * k / 3)))
    return patterns


def _mentions(tokens: list[str], patterns: list[_Pattern]) -> list[_Mention]:
    lemmas = [_lemma(t) for t in tokens]
    stems = [_stem(w) for w in lemmas]
    n = len(tokens)
    found: list[_Mention] = []
    # Phrases match over the words alone: "I'm not sure, but ..." is the option "I’m not sure but".
    words = [i for i, t in enumerate(tokens) if t not in _PUNCTUATION]
    word_lemmas = [lemmas[i] for i in words]
    for o, pat in enumerate(patterns):
        size = len(pat.phrase)
        if size:
            found += [
                _Mention(o, words[i], words[i + size - 1] + 1, True)
                for i in range(len(words) - size + 1)
                if tuple(word_lemmas[i : i + size]) == pat.phrase
            ]
        if size == 1 and len(pat.phrase[0]) >= 6:  # a compound written apart: "easy listening"
            apart = [i for i in range(n - 1) if tokens[i] + tokens[i + 1] == pat.phrase[0]]
            found += [_Mention(o, i, i + 2, True) for i in apart]
        if not pat.distinctive:
            continue
        window = size + 4
        p = 0
        while p < n:
            if stems[p] not in pat.distinctive:
                p += 1
                continue
            seen, last = set(), p
            for q in range(p, min(n, p + window)):
                if tokens[q] in _CLAUSE_END:
                    break
                if stems[q] in pat.distinctive:
                    seen.add(stems[q])
                    last = q
            if len(seen) >= pat.required:
                found.append(_Mention(o, p, last + 1, False))
                p = last + 1
            else:
                p += 1
    # A mention inside a longer phrase mention of another option is part of that option.
    return [
        m
        for m in found
        if not any(
            big.phrase
            and big.option != m.option
            and big.start <= m.start
            and m.end <= big.end
            and big.end - big.start > m.end - m.start
            for big in found
        )
    ]


def _negated(tokens: list[str], in_mention: list[bool]) -> list[bool]:
    """Which tokens lie in the scope of a negation."""
    n = len(tokens)
    negated = [False] * n
    for i, token in enumerate(tokens):
        previous = tokens[i - 1] if i else ""
        verbal = token in _VERBAL_NEGATORS or token.endswith("n't")
        nominal = (
            token in _NOMINAL_NEGATORS
            or (token == "of" and previous == "instead")
            or (token == "to" and previous == "opposed")
        )
        if not (verbal or nominal):
            continue
        j = i + 1
        if verbal:
            while j < n and tokens[j] in _LEAD_IN and not in_mention[j]:
                j += 1
        free = 0
        while j < n:
            if not in_mention[j]:
                if tokens[j] in _CLAUSE_END or tokens[j] in _SCOPE_END:
                    break
                if tokens[j] not in _CONNECTORS:
                    free += 1
                    if free > _SCOPE_FREE_WORDS:
                        break
            negated[j] = True
            j += 1
    return negated


def _hedged(tokens: list[str], mentions: list[_Mention]) -> set[int]:
    """Indices of mentions listed together with other options ("dog or cat", "dog, cat, pig")."""
    order = sorted(range(len(mentions)), key=lambda k: (mentions[k].start, mentions[k].end))
    hedged: set[int] = set()
    group = [order[0]] if order else []
    conjunction = False

    def close() -> None:
        options = {mentions[k].option for k in group}
        if len(options) >= 2 and (conjunction or len(group) >= 3):
            hedged.update(group)

    for k in order[1:]:
        before, this = mentions[group[-1]], mentions[k]
        between = tokens[before.end : this.start]
        if this.start >= before.end and all(t in _LIST_JOINERS for t in between):
            group.append(k)  # "rock, punk" lists; "the rooster crows" (nothing between) does not
            conjunction = conjunction or any(t in _CONJUNCTIONS or t == "," for t in between)
            continue
        if this.start < before.end:  # overlapping mentions stay in the running group
            continue
        close()
        group, conjunction = [k], False
    if group:
        close()
    return hedged


def _explicit(tokens: list[str], start: int) -> bool:
    """Whether the mention at `start` is stated outright ("the answer is X", "it sounds X")."""
    j = start - 1
    while j >= 0 and tokens[j] in _MARKER_FILLERS:
        j -= 1
    if j >= 1 and tokens[j - 1] == "there":  # "there is a dog and a cat" states nothing
        return False
    return any(j + 1 >= len(m) and tuple(tokens[j + 1 - len(m) : j + 1]) == m for m in _MARKERS)


# A strong statement of the answer: "the (correct) answer is X", "Answer: X", "I'd say X",
# "I choose X" (not "the answer could be X, Y or Z", which lists possibilities).
_ANSWER_NOUNS = frozenset({"answer", "option", "choice", "statement", "response", "genre", "category"})
_STATEMENT_VERBS = (("is",), ("would", "be"), ("will", "be"), ("should", "be"), ("must", "be"), (":",))
_FIRST_PERSON = (("i", "say"), ("i'd", "say"), ("i", "would", "say"), ("i", "choose"), ("i", "select"),
                 ("i", "pick"), ("i'll", "go", "with"), ("i", "would", "choose"))  # fmt: skip


def _sentences(tokens: list[str]) -> list[int]:
    """The sentence index of each token (a new sentence after . ! ? ; or a line break)."""
    index, out = 0, []
    for t in tokens:
        out.append(index)
        if t in _SENTENCE_END:
            index += 1
    return out


def _statements(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token spans stated as the answer: what follows "answer is" / "Answer:" /
    "I'd say" up to the end of its sentence, and what precedes "is the correct answer"."""
    spans, n = [], len(tokens)
    for i, t in enumerate(tokens):
        if t in _ANSWER_NOUNS:
            for verb in _STATEMENT_VERBS:
                if tuple(tokens[i + 1 : i + 1 + len(verb)]) == verb:
                    start = i + 1 + len(verb)
                    if start < n and tokens[start] == ":":  # "answer is: X"
                        start += 1
                    end = next((j for j in range(start, n) if tokens[j] in _SENTENCE_END), n)
                    if end > start:
                        spans.append((start, end))
                    break
            # "X is the (correct) answer"
            j = i - 1
            while j >= 0 and tokens[j] in _ANSWER_ADJECTIVES:
                j -= 1
            if j >= 1 and tokens[j] == "the" and tokens[j - 1] == "is":
                begin = max((k + 1 for k in range(j - 1) if tokens[k] in _SENTENCE_END), default=0)
                spans.append((begin, j - 1))
    for phrase in _FIRST_PERSON:
        for i in range(n - len(phrase) + 1):
            if tuple(tokens[i : i + len(phrase)]) == phrase:
                start = i + len(phrase)
                end = next((j for j in range(start, n) if tokens[j] in _SENTENCE_END), n)
                spans.append((start, end))
    # "The most appropriate expression to find ... is X": a judging subject, then its verb
    for i in range(n - 1):
        if tokens[i] == "the" and tokens[i + 1] in _JUDGING:
            end = next((j for j in range(i, n) if tokens[j] in _SENTENCE_END), n)
            verb = next((j for j in range(i + 2, end) if tokens[j] in ("is", "are", ":")), None)
            if verb is not None:
                spans.append((verb + 1 + (verb + 1 < end and tokens[verb + 1] == ":"), end))
    return sorted(set(spans))


def _answer(tokens: list[str], patterns: list[_Pattern]) -> frozenset[int]:
    """The options a response gives as its answer (empty: none). In order of precedence:
    the options in its last explicit answer statement ("the answer is X"); the one option it
    names without rejecting it; the one option stated outright ("it is X", "sounds X") among
    those not listed as alternatives; the option the response opens with; the options of the
    first sentence that names any
    (models state their choice first and explain after). Several options are a hedge ("dog or
    cat") or a multi-label answer ("engine, siren and train")."""
    mentions = _mentions(tokens, patterns)
    if not mentions:
        return frozenset()
    in_mention = [False] * len(tokens)
    for m in mentions:
        for j in range(m.start, m.end):
            in_mention[j] = True
    negated = _negated(tokens, in_mention)
    live = [m for m in mentions if not negated[m.start]]
    if not live:
        return frozenset()
    # The statements that name one option; when they disagree, the last (a final answer).
    stated = [frozenset(m.option for m in live if a <= m.start < b) for a, b in _statements(tokens)]
    single = [s for s in stated if len(s) == 1]
    if single:
        return single[-1]
    free = frozenset(m.option for m in live)
    if len(free) == 1:
        return free
    hedged = _hedged(tokens, mentions)
    sure = [m for k, m in enumerate(mentions) if m in live and k not in hedged]
    explicit = frozenset(m.option for m in sure if _explicit(tokens, m.start))
    if len(explicit) == 1:
        return explicit
    first = next((j for j, t in enumerate(tokens) if t not in _PUNCTUATION and t not in _ARTICLES), -1)
    opening = frozenset(m.option for m in sure if m.start == first)
    if len(opening) == 1:  # "Dog. It barks, unlike a cat."
        return opening
    sentence = _sentences(tokens)
    lead = min(sentence[m.start] for m in live)
    answer = frozenset(m.option for m in live if sentence[m.start] == lead)
    # naming every one of three or more options restates the question: no answer
    return frozenset() if len(answer) == len(patterns) >= 3 else answer


# A lettered option referred to by its letter: the whole response ("C", "(c)", "C."), a
# parenthesised capital ("I choose (C)"), or a capital after option/answer/choice ("Answer: C").
_LETTER_REFERENCE = re.compile(
    r"^\s*\(?([A-Za-z])\)?[.):]?\s*$"
    r"|\(([A-Z])\)"
    r"|\b(?i:option|answer|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b(?![a-z'])"
)


def _letter(response: str, letters: Sequence[str]) -> int | None:
    """The index of the one lettered option the response names by its letter, else None."""
    named = {next(g for g in m.groups() if g).upper() for m in _LETTER_REFERENCE.finditer(response)}
    named &= set(letters)
    return letters.index(named.pop()) if len(named) == 1 else None


def _response_answer(
    response: str, options: Sequence[str], letters: Sequence[str] = ()
) -> tuple[frozenset[int] | None, str]:
    """(the indices of the options `response` gives as its answer, or None for an empty or
    degenerate response; how: empty, degenerate, exact, letter, read)."""
    if not response.strip():
        return None, "empty"
    if is_degenerate(response):
        return None, "degenerate"
    text = normalize(response)
    for i, option in enumerate(options):
        if normalize(option) == text:
            return frozenset({i}), "exact"
    if letters:
        index = _letter(response, letters)
        if index is not None:
            return frozenset({index}), "letter"
    return _answer(_tokens(response), _patterns(options)), "read"


def _commit(response: str, options: Sequence[str], letters: Sequence[str] = ()) -> tuple[str | None, str]:
    """(the one option the response commits to or None, reason: empty, degenerate, committed,
    no-commitment). Several options (a hedge) commit to none."""
    answer, how = _response_answer(response, options, letters)
    if answer is None:
        return None, how
    if len(answer) != 1:
        return None, "no-commitment"
    return options[next(iter(answer))], "committed"


def commit(response: str, options: Sequence[str]) -> str | None:
    """The option (exactly as written in `options`) that `response` commits to, or None."""
    return _commit(response, options)[0]


# Two long responses that name no option say the same thing when most of their words, in order,
# are the same: a sentence reworded after the edit, an explanation cut at another token. In a
# short response every word is the claim ("/d/" or "/ae/"): it must be the same text.
SAME_CONTENT = 0.6
LONG_RESPONSE = 20  # words
_WORD = re.compile(r"\w+")


def same_content(a: str, b: str) -> bool:
    """Whether two responses say essentially the same thing: the same words, or, both of at
    least LONG_RESPONSE words, a word-sequence similarity (the share of their words in a common
    order, difflib) of at least SAME_CONTENT."""
    x, y = _WORD.findall(a.casefold()), _WORD.findall(b.casefold())
    if x == y:
        return True
    if min(len(x), len(y)) < LONG_RESPONSE:
        return False
    return difflib.SequenceMatcher(None, x, y, autojunk=False).ratio() >= SAME_CONTENT


def _letters(question: str, options: Sequence[str]) -> tuple[str, ...]:
    letters = option_letters(question)
    return letters if len(letters) == len(options) else ()


# Bumped whenever a rule changes a verdict: runs judged under other rules are other runs.
RULES_VERSION = 3


class RuleJudge:
    """Offline judge built on `commit`; it always reaches a verdict."""

    name = "rule"

    def identity(self) -> dict[str, object]:
        return {"name": self.name, "rules": RULES_VERSION}

    def correctness(self, cases: Sequence[CorrectnessCase]) -> list[Judgment]:
        """Correct when the response commits to the option the truth means (a label id such as
        `vocal_fry` or a letter maps onto its option; a truth that names none counts as one)."""
        out = []
        for case in cases:
            if case.response.strip() and normalize(case.response) == normalize(case.truth):
                out.append(Judgment(True, "committed", committed=case.truth))  # the paper's rule
                continue
            options = tuple(case.options)
            letters = _letters(case.question, options)
            truth = resolve_answer(case.truth, options, case.question)
            if truth is None:
                options, truth = (*options, case.truth), case.truth
            chosen, reason = _commit(case.response, options, letters)
            out.append(Judgment(verdict=chosen == truth, reason=reason, committed=chosen))
        return out

    def consistency(self, cases: Sequence[ConsistencyCase]) -> list[Judgment]:
        """Consistent when both responses give the same answer: the same option (or set of
        options), or, when neither names one, the same text. The paper's rules come first: an
        empty `after` is inconsistent, an `after` equal to `before` consistent."""
        out = []
        for case in cases:
            if not case.after.strip():
                out.append(Judgment(False, "empty"))
                continue
            if normalize(case.after) == normalize(case.before):
                after, _ = _commit(case.after, case.options, _letters(case.question, case.options))
                out.append(Judgment(True, "same-text", committed=after))
                continue
            letters = _letters(case.question, case.options)
            before, _ = _response_answer(case.before, case.options, letters)
            after, how = _response_answer(case.after, case.options, letters)
            single = case.options[next(iter(after))] if after and len(after) == 1 else None
            if after is None:
                verdict, reason = False, how
            elif before and after:
                verdict = before == after
                reason = "same-option" if verdict else "different-option"
            elif not before and not after:
                verdict = same_content(case.before, case.after)
                reason = "same-text" if verdict else "different-text"
            else:
                verdict = False
                reason = "commitment-lost" if not after else "commitment-gained"
            out.append(Judgment(verdict=verdict, reason=reason, committed=single))
        return out

"""The offline rule judge (`commit`, RuleJudge) and the degeneration detector."""

from __future__ import annotations

import pytest

from evaluation import degeneration
from evaluation.degeneration import is_degenerate
from evaluation.judges.base import ConsistencyCase, CorrectnessCase, Judge, Judgment
from evaluation.judges.rule import RuleJudge, commit

ANIMALS = ("dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow")
EMOTIONS = ("happy", "disgust", "sad", "fear", "angry")
GENDERS = ("Male", "Female")
GENDERS_LOWER = ("male", "female")
LANGUAGES = ("English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean")
COUNTS = ("one", "two", "three", "four")
LOUDNESS = ("loud", "quiet")
PITCH = ("rising", "falling")
PORTABILITY = (
    "a nesting box",
    "a bird feeder",
    "being cheated by a seller",
    "hearing footsteps in the dark",
    "losing a loved pet",
)


# --------------------------------------------------------------------------- degeneration


@pytest.mark.parametrize(
    "text",
    [
        "catholic catholic catholic catholic",
        "the dog the dog the dog the dog",
        "dog, dog, dog, dog",
        "Dog. dog. DOG. dog.",
        "I am a cat I am a cat I am a cat I am a cat",
        "dogdogdogdogdog",
        "!!!!!!!!!!!!",
        "ababababababab",
        "abababababab",
        "我我我我我我我我我我我我",
        "The answer is dog. " + "dog " * 10,
        "The sound is made by an animal, most likely a farm animal. " + "baa " * 8,
        "The answer is dog, because it barks and " + "!" * 40,
    ],
)
def test_degenerate(text):
    assert is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "dog",
        "the answer is dog",
        "no no",
        "dog dog dog",
        "happy",
        "I think it is a cow. Cows moo.",
        "one, two, three",
        "1111",
        "hahaha",
        "ababababab",
        "dogdogdog",
        "very very good",
        "The answer is dog. The dog barks; the cat does not.",
        "Clearly this animal sounds like a dog, and dog owners would agree: it is a dog, dog dog dog.",
        "The answer is dog.\n\n--------------\nExplanation: the clip has a bark, typical of dogs, not cats.",
    ],
)
def test_not_degenerate(text):
    assert not is_degenerate(text)


def test_degeneration_thresholds_are_the_documented_bars():
    n = degeneration.WORD_MIN_REPEATS
    assert is_degenerate(" ".join(["moo"] * n))
    assert not is_degenerate(" ".join(["moo"] * (n - 1)))
    # the run must cover enough of the text unless it is a long loop
    preamble = "the recording contains a clear sound made by some animal in a field " * 2
    assert not is_degenerate(preamble + " ".join(["moo"] * n))
    assert is_degenerate(preamble + " ".join(["moo"] * degeneration.WORD_LONG_LOOP))
    unit = "ab"
    shortest = unit * max(degeneration.CHAR_MIN_REPEATS, degeneration.CHAR_MIN_RUN // len(unit))
    assert is_degenerate(shortest)
    assert not is_degenerate(shortest[:-2])


# --------------------------------------------------------------------------- commit

COMMITS = [
    # exact option, case, punctuation, quotes
    ("dog", ANIMALS, "dog"),
    ("Dog.", ANIMALS, "dog"),
    ("  COW!  ", ANIMALS, "cow"),
    ("'fear'", EMOTIONS, "fear"),
    ('"Fear."', EMOTIONS, "fear"),
    ("female", GENDERS, "Female"),
    ("MALE", GENDERS, "Male"),
    ("Female voice", GENDERS_LOWER, "female"),
    # answer patterns
    ("The answer is cat.", ANIMALS, "cat"),
    ("Answer: Male", GENDERS, "Male"),
    ("ANSWER: FEAR!!!", EMOTIONS, "fear"),
    ("It is a pig.", ANIMALS, "pig"),
    ("The speaker is speaking French.", LANGUAGES, "French"),
    ("The speaker's language is German.", LANGUAGES, "German"),
    ("It's rising in pitch.", PITCH, "rising"),
    # explanations that reject other options
    (
        "I would say 'fear' because the voice trembles; it does not sound angry, sad or disgusted.",
        EMOTIONS,
        "fear",
    ),
    ("It's not a dog, it's a cat", ANIMALS, "cat"),
    ("It's fear, not anger.", EMOTIONS, "fear"),
    ("The speaker is a man, not a woman.", GENDERS, "Male"),
    ("It sounds like a woman speaking, not a man.", GENDERS, "Female"),
    ("The speaker is not female but male.", GENDERS, "Male"),
    ("The sound is made by a rooster, not a hen.", ANIMALS, "rooster"),
    ("It is more likely a cat than a dog.", ANIMALS, "cat"),
    ("The clip is loud rather than quiet.", LOUDNESS, "loud"),
    ("It is not a dog as the sound has a meowing quality typical of a cat.", ANIMALS, "cat"),
    ("I don't think it's a dog, it's a cat.", ANIMALS, "cat"),
    ("No, it is a cat.", ANIMALS, "cat"),
    ("Not sure, but I think it's a cat.", ANIMALS, "cat"),
    ("It does not sound like an angry person, more like a sad one.", EMOTIONS, "sad"),
    ("Sad, not happy.", EMOTIONS, "sad"),
    # several options named, an explicit statement decides
    ("The options are dog, cat and pig. The answer is pig.", ANIMALS, "pig"),
    ("The answer could be dog, cat, or pig. It is a pig.", ANIMALS, "pig"),
    ("Happy or sad? I'd say sad.", EMOTIONS, "sad"),
    ("I'd be happy to help! The emotion is anger.", EMOTIONS, "angry"),
    # several options named, the response opens with one
    ("Dog. It barks, unlike a cat.", ANIMALS, "dog"),
    ("Cat. The sound could be confused with a dog.", ANIMALS, "cat"),
    ("The rooster crows.", ANIMALS, "rooster"),
    # inflections, plurals, synonyms
    ("anger", EMOTIONS, "angry"),
    ("The emotion expressed is happiness.", EMOTIONS, "happy"),
    ("The speaker sounds disgusted.", EMOTIONS, "disgust"),
    ("That smell is disgusting!", EMOTIONS, "disgust"),
    ("She sounds fearful", EMOTIONS, "fear"),
    ("The speaker sounds scared.", EMOTIONS, "fear"),
    ("sadness", EMOTIONS, "sad"),
    ("Dogs barking", ANIMALS, "dog"),
    ("Those are cows.", ANIMALS, "cow"),
    ("A flock of sheep.", ANIMALS, "sheep"),
    ("hens clucking", ANIMALS, "hen"),
    ("Two roosters crowing", ANIMALS, "rooster"),
    ("The frogs are croaking.", ANIMALS, "frog"),
    ("A dog's bark.", ANIMALS, "dog"),
    ("A woman is speaking.", GENDERS, "Female"),
    ("The voice is feminine.", GENDERS, "Female"),
    ("It is a man.", GENDERS_LOWER, "male"),
    ("Mandarin", LANGUAGES, "Chinese"),
    # numbers
    ("4", COUNTS, "four"),
    ("There are 2 sounds.", COUNTS, "two"),
    ("I hear three distinct sounds.", COUNTS, "three"),
    # long options, by their distinctive words
    ("Probably someone who got cheated by a seller.", PORTABILITY, "being cheated by a seller"),
    ("Hearing footsteps in the dark would be scary.", PORTABILITY, "hearing footsteps in the dark"),
    ("The person fears losing their loved pet.", PORTABILITY, "losing a loved pet"),
    ("Nesting box.", PORTABILITY, "a nesting box"),
    ("The answer is a bird feeder.", PORTABILITY, "a bird feeder"),
]


@pytest.mark.parametrize(("response", "options", "expected"), COMMITS)
def test_commit(response, options, expected):
    assert commit(response, options) == expected


UNDECIDED = [
    # empty and degenerate output
    ("", ANIMALS),
    ("   \n\t", ANIMALS),
    ("dog dog dog dog dog", ANIMALS),
    ("fearfearfearfearfearfear", EMOTIONS),
    # hedges: two options, neither rejected nor stated outright
    ("it could be dog or cat", ANIMALS),
    ("It is a dog or a cat.", ANIMALS),
    ("It is dog, cat, or pig.", ANIMALS),
    ("either happy or sad", EMOTIONS),
    ("male or female", GENDERS),
    ("Dog/cat", ANIMALS),
    ("There is a dog barking and a cat meowing.", ANIMALS),
    # bare rejections commit to nothing (not to the remaining option)
    ("not male", GENDERS),
    ("The speaker is not male.", GENDERS),
    ("The emotion is not happy.", EMOTIONS),
    ("Neither male nor female.", GENDERS),
    ("I don't think it's a dog.", ANIMALS),
    # no option named
    ("Yes", ANIMALS),
    ("I cannot determine the emotion.", EMOTIONS),
    ("I'm afraid I cannot tell.", EMOTIONS),
    ("The answer is a wolf.", ANIMALS),
    # word boundaries and too few distinctive words
    ("It is a mallet.", GENDERS_LOWER),
    ("the dark", PORTABILITY),
    ("a bird", PORTABILITY),
]


@pytest.mark.parametrize(("response", "options"), UNDECIDED)
def test_commit_none(response, options):
    assert commit(response, options) is None


def test_commit_returns_the_option_as_written():
    assert commit("the speaker is a WOMAN", ("MALE", "FEMALE")) == "FEMALE"
    assert commit("female", ("male", "female")) == "female"
    assert commit("male", ("female", "male")) == "male"


def test_commit_without_options():
    assert commit("dog", ()) is None


# --------------------------------------------------------------------------- RuleJudge


def test_rule_judge_is_a_judge():
    judge = RuleJudge()
    assert isinstance(judge, Judge)
    assert judge.name == "rule"


def _correct(response: str, truth: str, options=ANIMALS) -> Judgment:
    return RuleJudge().correctness([CorrectnessCase("What animal?", tuple(options), truth, response)])[0]


@pytest.mark.parametrize(
    ("response", "truth", "options", "verdict", "reason", "committed"),
    [
        ("The answer is cat.", "cat", ANIMALS, True, "committed", "cat"),
        ("The answer is cat.", "dog", ANIMALS, False, "committed", "cat"),
        ("female", "Female", GENDERS, True, "committed", "Female"),
        ("Female", "female", GENDERS_LOWER, True, "committed", "female"),
        ("", "dog", ANIMALS, False, "empty", None),
        ("dogdogdogdogdogdog", "dog", ANIMALS, False, "degenerate", None),
        ("it could be dog or cat", "dog", ANIMALS, False, "no-commitment", None),
        ("not male", "female", GENDERS_LOWER, False, "no-commitment", None),
        # the truth is not among the options: it still counts as one
        ("It is a wolf.", "wolf", ANIMALS, True, "committed", "wolf"),
        ("It is a wolf, not a dog.", "wolf", ANIMALS, True, "committed", "wolf"),
        ("It is a dog.", "wolf", ANIMALS, False, "committed", "dog"),
    ],
)
def test_correctness(response, truth, options, verdict, reason, committed):
    j = _correct(response, truth, options)
    assert (j.verdict, j.reason, j.committed) == (verdict, reason, committed)


def test_correctness_keeps_order_and_always_decides():
    cases = [
        CorrectnessCase("q", EMOTIONS, "fear", "I'd say fear."),
        CorrectnessCase("q", EMOTIONS, "fear", "angry"),
        CorrectnessCase("q", EMOTIONS, "fear", ""),
    ]
    out = RuleJudge().correctness(cases)
    assert [j.verdict for j in out] == [True, False, False]
    assert all(j.valid for j in out)
    assert RuleJudge().correctness([]) == []


@pytest.mark.parametrize(
    ("before", "after", "options", "verdict", "reason", "committed"),
    [
        ("dog", "The answer is dog.", ANIMALS, True, "same-option", "dog"),
        ("Dogs.", "It's a dog, not a cat.", ANIMALS, True, "same-option", "dog"),
        ("anger", "The speaker sounds angry.", EMOTIONS, True, "same-option", "angry"),
        ("dog", "cat", ANIMALS, False, "different-option", "cat"),
        ("The speaker is a man.", "The speaker is a woman.", GENDERS, False, "different-option", "Female"),
        ("I don't know.", "i don't know", ANIMALS, True, "same-text", None),
        ("Paris is the capital.", "Paris is the capital", (), True, "same-text", None),
        ("Paris is the capital.", "Rome is the capital.", (), False, "different-text", None),
        ("dog", "", ANIMALS, False, "empty", None),
        ("", "", ANIMALS, False, "empty", None),
        ("hmm", "   ", ANIMALS, False, "empty", None),
        # the paper's rules first: an unchanged answer is consistent, even a looping one
        ("moo moo moo moo", "moo moo moo moo", ANIMALS, True, "same-text", None),
        ("dog", "dog dog dog dog dog", ANIMALS, False, "degenerate", None),
        ("dog", "I cannot tell.", ANIMALS, False, "commitment-lost", None),
        ("I cannot tell.", "dog", ANIMALS, False, "commitment-gained", "dog"),
    ],
)
def test_consistency(before, after, options, verdict, reason, committed):
    j = RuleJudge().consistency([ConsistencyCase("q", tuple(options), before, after)])[0]
    assert (j.verdict, j.reason, j.committed) == (verdict, reason, committed)


def test_consistency_keeps_order():
    cases = [
        ConsistencyCase("q", ANIMALS, "dog", "dog"),
        ConsistencyCase("q", ANIMALS, "dog", "pig"),
        ConsistencyCase("q", ANIMALS, "cow", "Cows."),
    ]
    assert [j.verdict for j in RuleJudge().consistency(cases)] == [True, False, True]

"""The rule judge reads verbose answers the way the paper's LLM judge does: hand-written cases of
what went wrong on real model outputs, and the agreement on the SAKE authors' own generations."""

from pathlib import Path

import pytest

from evaluation.agreement import agreement, judged
from evaluation.judges.base import ConsistencyCase, CorrectnessCase
from evaluation.judges.rule import RuleJudge, commit

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT.parent / "shared" / "data" / "sake-authors-outputs" / "MEND-Qwen2-Audio" / "single"
REFERENCE = ROOT / "benchmarks" / "reference" / "sake_table9_mend_qwen2audio.yaml"
ECOSYSTEMS = ("Coral reefs", "Kelp forests", "Mangroves", "Seagrass meadows")
CONDIMENTS = ("Salt and pepper", "Oil and vinegar", "Mustard")
AMOUNTS = ("80 s", "160 s", "2,000 s", "5,000 s")
GENRES = ("classical", "electronic", "jazz", "metal", "pop", "punk", "rock")


def consistent(before: str, after: str, options=ECOSYSTEMS, question: str = "q") -> bool:
    return RuleJudge().consistency([ConsistencyCase(question, tuple(options), before, after)])[0].verdict


@pytest.mark.parametrize(
    ("response", "options", "expected"),
    [
        # the choice first, an explanation naming the other options after it
        ("The correct answer is: Coral reefs. Unlike kelp forests or mangroves, coral reefs are built by "
         "animals, and seagrass meadows are plants.", ECOSYSTEMS, "Coral reefs"),
        ("Coral reefs are the most diverse, far more than kelp forests, mangroves or seagrass meadows.",
         ECOSYSTEMS, "Coral reefs"),
        # an explanation first, a final answer last
        ("Kelp forests grow in cold water and mangroves on tropical coasts, so the ecosystem built by "
         "animals must be something else. Therefore, the answer is coral reefs.", ECOSYSTEMS, "Coral reefs"),
        ("Mangroves is the correct answer, since only they grow between the tides.", ECOSYSTEMS, "Mangroves"),
        ("The most appropriate choice here, given the salt water, is seagrass meadows.", ECOSYSTEMS,
         "Seagrass meadows"),
        # options that contain "and" are options, not hedges
        ("Salt and pepper.", CONDIMENTS, "Salt and pepper"),
        ("I'd say oil and vinegar, because the question asks for a dressing.", CONDIMENTS, "Oil and vinegar"),
        # a negation ends where a new clause begins
        ("A dressing is not complete if it lacks oil and vinegar.", CONDIMENTS, "Oil and vinegar"),
        # a number inside another number is no mention
        ("It takes about 2 seconds per count, so the student needs 5,000 s in total.", AMOUNTS, "5,000 s"),
    ],
)  # fmt: skip
def test_verbose_answers_commit_to_what_they_state(response, options, expected):
    assert commit(response, options) == expected


def test_compounds_written_apart_and_diacritics():
    assert commit("The genre is easy listening.", ("easylistening", "chillout", "lounge")) == "easylistening"
    assert commit("The middle phone is l̪.", ("l", "l̪", "n")) == "l̪"
    assert commit("The middle phone is l.", ("l", "l̪", "n")) == "l"


def test_restating_every_option_is_no_answer():
    assert commit("It could be coral reefs, kelp forests, mangroves or seagrass meadows.", ECOSYSTEMS) is None


def test_the_papers_rules_come_first():
    loop = "reef reef reef reef reef reef reef reef"
    assert consistent(loop, loop)  # unchanged, even though it loops
    assert not consistent("", "")  # empty is inconsistent
    judge = RuleJudge()
    label = CorrectnessCase("Which technique?", ("belt", "vocal fry"), "vocal_fry", "vocal_fry")
    assert judge.correctness([label])[0].verdict  # equal to the truth is correct


def test_answer_sets_compare_as_sets():
    """Multi-label answers and hedges are the options they give, compared as sets."""
    assert consistent("rock, punk", "The genre could be rock or punk, given the fast tempo.", GENRES)
    assert not consistent("rock", "rock, punk", GENRES)
    assert not consistent("The answer is 80 s.", "Therefore, the correct answer is 160 s.", AMOUNTS)


def test_long_answers_that_say_the_same_thing_are_consistent():
    """Neither names an option: a sentence reworded, an explanation cut at another token."""
    head = (
        "To solve this we first compute the mean of the ten counts, which is 2.0 per second, and "
        "then we estimate the uncertainty of the rate from the Poisson statistics of the counts, "
    )
    assert consistent(
        head + "which scales as one over the square root of", head + "which goes as one over the root"
    )
    other = "I do not know how to compute this; the question needs more information about the isotope."
    assert not consistent(head + "which scales as one over the square root of", other)
    # short answers: every word is the claim
    assert not consistent("The phone in the middle is /d/.", "The phone in the middle is /ae/.")


def test_the_rule_judge_agrees_with_the_papers_llm_judge_on_real_outputs():
    """Re-scoring the SAKE authors' MEND generations on Qwen2-Audio: each cell of the paper's
    Table 9 ALL row within 2 points, every per-attribute cell within 4."""
    if not OUTPUTS.is_dir():
        pytest.skip("../shared/data/sake-authors-outputs is not beside the repo")
    _, metrics = judged(OUTPUTS, RuleJudge())
    cells = agreement(metrics, REFERENCE)
    assert len(cells) == 12 + 4 * 12 - 1  # gender has no audio locality type 2
    for c in cells:
        assert c.judge is not None and abs(c.gap) <= (2.0 if c.row == "ALL" else 4.0), c
    for c in cells:  # the correctness metrics stay where they were
        if c.cell.startswith(("reliability", "generality")):
            assert abs(c.gap) < 0.01, c

"""No drift: after many single edits (apply, then undo) every parameter and buffer of the model is
bitwise what it was, and no hook is left behind. A few edits per weight editor in the fast suite,
100 under `-m slow`."""

import itertools

import pytest
import torch

from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from editors.hypernet import HypernetEditor
from evaluation.sweep import request
from tests.helpers import configured

CORPUS = (
    "editor.hparams.corpus.text=10",
    "editor.hparams.corpus.audio=5",
    "editor.hparams.corpus.cache_dir=null",
)
SEARCH = ("editor.hparams.search.steps=10",)
# The weight editors as evaluate.py builds them on the tiny model, with fewer steps and questions.
EDITORS = {
    "mend": lambda lalm, pool: HypernetEditor(configured("mend", lalm, pool, "editor.hparams.edit_lr=5.0")),
    "ke": lambda lalm, pool: HypernetEditor(
        configured(
            "ke",
            lalm,
            pool,
            "editor.hparams.lstm_dim=8",
            "editor.hparams.condition_dim=16",
            "editor.hparams.hidden_dim=8",
            "editor.hparams.max_scale=1e3",
        )
    ),  # fmt: skip
    "ft_llm": lambda lalm, pool: configured("ft_llm", lalm, pool, "editor.hparams.max_steps=3"),
    "ft_audio": lambda lalm, pool: configured("ft_audio", lalm, pool, "editor.hparams.max_steps=3"),
    "rome": lambda lalm, pool: configured("rome", lalm, pool, *CORPUS, *SEARCH),
    "alphaedit": lambda lalm, pool: configured("alphaedit", lalm, pool, *CORPUS, *SEARCH),
    "unke": lambda lalm, pool: configured(
        "unke",
        lalm,
        pool,
        "editor.hparams.preservation.text=2",
        "editor.hparams.preservation.audio=1",
        "editor.hparams.target.steps=5",
        "editor.hparams.block.steps=3",
    ),  # fmt: skip
    "wise": lambda lalm, pool: configured(
        "wise",
        lalm,
        pool,
        "editor.hparams.preservation.text=2",
        "editor.hparams.preservation.audio=2",
        "editor.hparams.training.steps=3",
    ),  # fmt: skip
}


def state(lalm):
    return {k: v.detach().clone() for k, v in lalm.model.state_dict().items()}


def hooks(lalm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lalm.model.modules())


def drift(name, lalm, pool, mini, mini_dir, edits: int) -> None:
    before, hooked = state(lalm), hooks(lalm)
    editor = EDITORS[name](lalm, pool)
    prompt = PromptMaker(AudioResolver(mini_dir / "audio"), lalm.sampling_rate)
    for inst in itertools.islice(itertools.cycle(mini.test), edits):
        editor.apply(request(inst, prompt(inst.reliability))).undo()
    after = state(lalm)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert hooks(lalm) == hooked


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_a_few_edits_leave_no_drift(name, shipped_lalm, pool, mini, mini_dir):
    drift(name, shipped_lalm, pool, mini, mini_dir, edits=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EDITORS))
def test_a_hundred_edits_leave_no_drift(name, shipped_lalm, pool, mini, mini_dir):
    drift(name, shipped_lalm, pool, mini, mini_dir, edits=100)

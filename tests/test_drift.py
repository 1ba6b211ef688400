"""No drift: after many single edits (apply, then undo) every parameter and buffer of the model is
bitwise what it was, and no hook is left behind. A few edits per weight editor in the fast suite,
100 under `-m slow`."""

import itertools

import pytest
import torch

from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from editors.alphaedit import AlphaEdit
from editors.finetune import FineTune
from editors.hypernet import HypernetEditor
from editors.ke import KE
from editors.mend import MEND
from editors.rome import ROME
from editors.unke import UnKE
from editors.wise import WISE
from evaluation.sweep import request

LOCATE = dict(corpus_text=10, corpus_audio=5, prefixes=[""], steps=10, clamp_norm=12.0, neutral_question=None)
EDITORS = {
    "mend": lambda lalm, root: HypernetEditor(MEND(lalm, rank=8, edit_lr=5.0)),
    "ke": lambda lalm, root: HypernetEditor(
        KE(lalm, lstm_dim=8, condition_dim=16, hidden_dim=8, max_scale=1e3)
    ),
    "ft_llm": lambda lalm, root: FineTune(lalm, "llm.layers.-1", lr=1e-3, max_steps=3),
    "ft_audio": lambda lalm, root: FineTune(lalm, "connector", lr=1e-2, max_steps=3),
    "rome": lambda lalm, root: ROME(lalm, ["llm.layers.1.mlp.down_proj"], root, cache_dir=None, **LOCATE),
    "alphaedit": lambda lalm, root: AlphaEdit(lalm, [1, 2], root, cache_dir=None, **LOCATE),
    "unke": lambda lalm, root: UnKE(
        lalm, 1, root, n_text=2, n_audio=1, key_steps=5, block_steps=3, block_lr=5e-3
    ),
    "wise": lambda lalm, root: WISE(lalm, -2, root, n_text=2, n_audio=2, lr=0.1, steps=3),
}


def state(lalm):
    return {k: v.detach().clone() for k, v in lalm.model.state_dict().items()}


def hooks(lalm) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lalm.model.modules())


def drift(name, lalm, mini, mini_dir, edits: int) -> None:
    before, hooked = state(lalm), hooks(lalm)
    editor = EDITORS[name](lalm, str(mini_dir))
    prompt = PromptMaker(AudioResolver(mini_dir / "audio"), lalm.sampling_rate)
    for inst in itertools.islice(itertools.cycle(mini.test), edits):
        editor.apply(request(inst, prompt(inst.reliability))).undo()
    after = state(lalm)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert hooks(lalm) == hooked


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_a_few_edits_leave_no_drift(name, shipped_lalm, mini, mini_dir):
    drift(name, shipped_lalm, mini, mini_dir, edits=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EDITORS))
def test_a_hundred_edits_leave_no_drift(name, shipped_lalm, mini, mini_dir):
    drift(name, shipped_lalm, mini, mini_dir, edits=100)

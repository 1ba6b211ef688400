"""SAKE's baselines that need no training: FT(LLM), FT(Audio), I-IKE, IE-IKE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common import EditRequest
from common.prompt import Prompt
from datamodules import AudioResolver
from editors.base import ContextHandle, in_context
from evaluation.judges.rule import RuleJudge
from evaluation.records import ResultsLog
from evaluation.responses import ResponseCache
from evaluation.sweep import Generation, Sweeper, request
from lalms.base import hidden
from tests.helpers import configured


def sweeper(lalm, editor, mini_dir) -> Sweeper:
    cache = ResponseCache(None, lalm.answers_fingerprint())
    return Sweeper(
        lalm, editor, RuleJudge(), AudioResolver(Path(mini_dir) / "audio"), cache, Generation(8, 64, 1)
    )


@pytest.mark.parametrize(("name", "site"), [("ft_llm", "llm.layers.-1"), ("ft_audio", "connector")])
def test_fine_tuning_edits_then_restores_every_parameter_bitwise(
    shipped_lalm, pool, mini, mini_dir, tmp_path, name, site
):
    editor = configured(name, shipped_lalm, pool)
    prefix = shipped_lalm.edit_sites.resolve(site) + "."
    assert editor.param_names and all(n.startswith(prefix) for n in editor.param_names)
    before = {k: v.clone() for k, v in shipped_lalm.model.state_dict().items()}
    items = mini.test[:4]
    log = ResultsLog(tmp_path / "single.jsonl")
    sw = sweeper(shipped_lalm, editor, mini_dir)
    sw.single(items, log)
    sw.sequential([mini.sequences[0][:3]], ResultsLog(tmp_path / "seq.jsonl"))
    after = shipped_lalm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(0 <= s <= 15 for s in editor.steps_taken) and len(editor.steps_taken) == 4 + 3
    if site == "llm.layers.-1":  # the last layer fits each edit well within 15 steps
        reliability = [q["verdict"] for r in log for q in r["queries"] if q["kind"] == "reliability"]
        assert sum(reliability) >= 3


def test_fine_tuning_stops_once_the_edit_loss_is_low(shipped_lalm, pool, mini, mini_dir):
    inst = mini.test[0]
    sw = sweeper(shipped_lalm, None, mini_dir)
    req = request(inst, sw.prompt(inst.reliability))
    editor = configured(
        "ft_llm", shipped_lalm, pool, "editor.hparams.stop_loss=1e9"
    )  # any loss is low enough
    editor.apply(req).undo()
    assert editor.steps_taken == [0]
    editor = configured("ft_llm", shipped_lalm, pool, "editor.hparams.stop_loss=0.0")  # never low enough
    handle = editor.apply(req)
    assert editor.steps_taken == [15]
    with torch.no_grad():
        assert float(shipped_lalm.loss([req.prompt], [req.target])) < 0.5  # it learned the target
    handle.undo()


def test_fine_tuning_rejects_a_bad_site(shipped_lalm, pool):
    with pytest.raises(KeyError, match="must start with llm.layers"):
        configured("ft_llm", shipped_lalm, pool, "editor.hparams.sites=[connector,decoder.layers.0]")
    with pytest.raises(ValueError, match="at least one edit site"):
        configured("ft_llm", shipped_lalm, pool, "editor.hparams.sites=[]")


def req(attribute="emotion", original="sad", target="happy", question="How does the speaker feel?"):
    return EditRequest(prompt=Prompt(question), target=target, original=original, attribute=attribute)


def test_instruction_ike_edits_through_the_system_prompt_and_accumulates(shipped_lalm, pool):
    before = {k: v.clone() for k, v in shipped_lalm.model.state_dict().items()}
    editor = configured("i_ike", shipped_lalm, pool)
    first = editor.apply(req())
    second = editor.apply(req("animal", "frog", "dog"))
    assert isinstance(first, ContextHandle)
    p = in_context([first, second], Prompt("Which animal?"))
    assert p.system.startswith("You are a helpful assistant.\n")
    assert p.system.index("perceived as sad") < p.system.index("perceived as frog")
    assert "from now on be perceived as happy" in p.system and "speakers' emotions" in p.system
    assert in_context([first], Prompt("q", system="Be brief.")).system.startswith("Be brief.\n")
    assert "from now on" in shipped_lalm.render(p)
    first.undo()
    with pytest.raises(RuntimeError, match="undone"):
        first.rewrite(Prompt("q"))
    second.undo()
    assert all(torch.equal(before[k], v) for k, v in shipped_lalm.model.state_dict().items())
    with pytest.raises(ValueError, match="no wording for attribute .timbre."):
        editor.apply(req("timbre"))


def test_demonstration_ike_retrieves_the_same_pair_with_audio(shipped_lalm, pool, mini, mini_dir):
    editor = configured("ie_ike", shipped_lalm, pool, "editor.hparams.max_history=null")
    for inst in (next(i for i in mini.test if i.attribute == "gender"), mini.test[-1]):
        r = request(inst, Prompt(inst.reliability.question))
        demos = editor.demonstrations(r)
        n_audio_loc = 3 if inst.attribute == "gender" else 4
        assert len(demos) == 1 + 3 + n_audio_loc + 1
        assert [t.answer for t in demos[:4]] == [inst.target] * 4
        assert all(t.audio is not None for t in demos[:-1]) and demos[-1].audio is None  # text QA last
        source = editor.source(r)
        pair = (inst.attribute, inst.original.casefold(), inst.target.casefold())
        pairs = {(i.attribute, i.original.casefold(), i.target.casefold()) for i in mini.train}
        if pair in pairs:  # the same (original, target) pair when the train split has one
            assert (inst.attribute, source.original.casefold(), source.target.casefold()) == pair
        else:  # else an instance of the same original label
            assert source.original.casefold() == pair[1]
        p = in_context([editor.apply(r)], Prompt("q"))
        assert p.history == demos and "from now on" in p.system
        # the dialogue fits the model's context and generates an answer
        width = shipped_lalm.encode([p])["input_ids"].shape[1]
        assert width <= shipped_lalm.model.config.text_config.max_position_embeddings
        (answer,) = shipped_lalm.generate([p], 4)
        assert isinstance(answer, str)


def test_demonstration_history_keeps_the_most_recent_turns(shipped_lalm, pool, mini, mini_dir):
    editor = configured("ie_ike", shipped_lalm, pool)  # max_history: 10
    a, b = (request(i, Prompt(i.reliability.question)) for i in (mini.test[0], mini.test[-1]))
    p = in_context([editor.apply(a), editor.apply(b)], Prompt("q"))
    assert len(p.history) == 10 and p.history[-1] == editor.demonstrations(b)[-1]


def test_the_sweep_asks_every_query_in_the_edit_context(shipped_lalm, pool, mini, mini_dir, tmp_path):
    sw = sweeper(shipped_lalm, configured("i_ike", shipped_lalm, pool), mini_dir)
    asked: list[Prompt] = []
    generate = sw.generate
    sw.prepare(mini.test[:1])  # pre-edit answers: asked without the edit

    def spy(prompts):
        asked.extend(prompts)
        return generate(prompts)

    sw.generate = spy
    sw.single(mini.test[:1], ResultsLog(tmp_path / "r.jsonl"))
    assert asked and all("from now on" in (p.system or "") for p in asked)


@pytest.fixture(scope="module")
def wise(shipped_lalm, pool):
    smaller = ("editor.hparams.preservation.text=4", "editor.hparams.preservation.audio=4")
    return configured("wise", shipped_lalm, pool, *smaller, "editor.hparams.training.steps=40")


def test_wise_routes_each_sample_of_a_mixed_batch_on_its_own(shipped_lalm, mini, mini_dir, wise):
    inst = next(i for i in mini.test if i.attribute == "animal")
    sw = sweeper(shipped_lalm, wise, mini_dir)
    edit_prompt = sw.prompt(inst.reliability)
    text_q = next(q for q in inst.text_locality)
    other = next(i for i in mini.test if i.attribute == "emotion")
    batch = [Prompt("What is two plus three?"), edit_prompt, sw.prompt(other.reliability), sw.prompt(text_q)]
    before = {k: v.clone() for k, v in shipped_lalm.model.state_dict().items()}
    unedited = shipped_lalm.generate(batch, 8)
    handle = wise.apply(request(inst, edit_prompt))
    assert wise.in_scope and wise.threshold == pytest.approx(0.88 * wise.in_scope[0])
    assert wise.routed(batch).tolist() == [False, True, False, False]
    edited = shipped_lalm.generate(batch, 8)
    assert edited[1] == inst.target and unedited[1] != inst.target
    assert [edited[i] for i in (0, 2, 3)] == [unedited[i] for i in (0, 2, 3)]  # main memory, unchanged
    # alone or in a batch, a sample gets the same answer (the decision is per sample)
    assert shipped_lalm.generate([batch[1]], 8) == [edited[1]] and shipped_lalm.generate([batch[2]], 8) == [
        edited[2]
    ]
    handle.undo()
    assert shipped_lalm.generate(batch, 8) == unedited and not wise._hooks
    assert all(torch.equal(before[k], v) for k, v in shipped_lalm.model.state_dict().items())


def test_wise_sequential_edits_undo_exactly(shipped_lalm, mini, mini_dir, wise):
    sw = sweeper(shipped_lalm, wise, mini_dir)
    side0 = wise.side.clone()
    handles = [wise.apply(request(i, sw.prompt(i.reliability))) for i in mini.sequences[0][:3]]
    assert len(wise.in_scope) == 3 and not torch.equal(wise.side, side0)
    for h in reversed(handles):
        h.undo()
    assert torch.equal(wise.side, side0) and wise.in_scope == [] and not wise._hooks
    with pytest.raises(RuntimeError, match="already undone"):
        handles[0].undo()


def test_unke_edits_the_block_through_the_models_own_calls_and_undoes_exactly(
    shipped_lalm, pool, mini, mini_dir
):
    smaller = ("editor.hparams.preservation.text=4", "editor.hparams.preservation.audio=2")
    unke = configured(
        "unke", shipped_lalm, pool, *smaller, "editor.hparams.block.lr=2e-3", "editor.hparams.block.steps=30"
    )
    assert unke.param_names and all(n.startswith(unke.path + ".") for n in unke.param_names)
    sw = sweeper(shipped_lalm, unke, mini_dir)
    inst = next(i for i in mini.test if i.attribute == "gender")
    prompt = sw.prompt(inst.reliability)
    text = Prompt("What is two plus three?\n\nOptions:\nfive\nfour\nsix\nseven")
    before = {k: v.clone() for k, v in shipped_lalm.model.state_dict().items()}
    unedited = shipped_lalm.generate([prompt, text], 8)
    # the block's recorded call reproduces the model's own output for it
    batch = shipped_lalm.to_device(shipped_lalm.encode([prompt]))
    args, kwargs, out = unke.block_call(batch)
    assert torch.allclose(hidden(unke.block(*args, **kwargs)), out, atol=1e-6)
    handle = unke.apply(request(inst, prompt))
    assert 0 < unke.target_norms[-1] <= 4.0 + 1e-4
    changed = [n for n in unke.param_names if not torch.equal(before[n], shipped_lalm.model.state_dict()[n])]
    assert changed and all(
        torch.equal(before[k], v) for k, v in shipped_lalm.model.state_dict().items() if k not in changed
    )
    edited = shipped_lalm.generate([prompt, text], 8)
    assert edited[0] == inst.target != unedited[0] and edited[1] == unedited[1]
    handle.undo()
    assert all(torch.equal(before[k], v) for k, v in shipped_lalm.model.state_dict().items())

"""The decoding speed-ups change no answer (issue 22): the output projection reading only the last
position, and the pre-edit pass batching queries of a kind together, give the answers of plain
transformers generation in the queries' own order, on 200 SAKE-mini queries of the shipped
model and on a tiny model of every family."""

from __future__ import annotations

import torch

from common.prompt import Prompt
from datamodules import SakeDataModule
from datamodules.examples import PromptMaker
from evaluation.responses import ResponseCache, pre_edit_responses


def plain_generate(lalm, prompts, max_new_tokens=32):
    """transformers' generate with no hook: the answers before the change."""
    with torch.no_grad():
        batch = lalm.to_device(lalm.encode(prompts))
        out = lalm.model.generate(**batch, generation_config=lalm.generation_config(max_new_tokens))
    new = out[:, batch["input_ids"].shape[1] :]
    return [s.strip() for s in lalm.tokenizer.batch_decode(new, skip_special_tokens=True)]


def queries(mini_dir, n):
    data = SakeDataModule(str(mini_dir), name="sake_mini")
    by_key = {(q.question, q.file, q.track): q for i in data.eval_instances("test") for q in i.queries()}
    return list(by_key.values())[:n], PromptMaker(data.resolver())


def test_200_answers_are_those_of_plain_generation(shipped_lalm, mini_dir):
    qs, make = queries(mini_dir, 200)
    assert len(qs) == 200 and any(q.file is None for q in qs) and any(q.file for q in qs)
    prompts = [make(q) for q in qs]
    before = [a for s in range(0, 200, 64) for a in plain_generate(shipped_lalm, prompts[s : s + 64])]
    assert [a for s in range(0, 200, 64) for a in shipped_lalm.generate(prompts[s : s + 64], 32)] == before
    # the pre-edit pass: batches of a kind, answers back under each query's own key
    keys = {id(q): f"q{i}" for i, q in enumerate(qs)}
    batches = []

    def generate(ps):
        batches.append(ps)
        return shipped_lalm.generate(ps, 32)

    got = pre_edit_responses(qs, ResponseCache(None, "fp"), generate, make, lambda q: keys[id(q)], 64)
    assert [got[f"q{i}"] for i in range(200)] == before
    kinds = [{p.audio is None for p in b} for b in batches]
    assert sum(len(k) > 1 for k in kinds) <= 1  # text-only and audio prompts meet in one batch at most


def test_every_family_answers_as_plain_generation(lalm, clips):
    tone, noise = clips
    prompts = [
        Prompt("What is the speaker's gender?", audio=tone),
        Prompt("Describe this sound in a few words.", audio=noise),
        Prompt("Which language is spoken in Brazil?"),
    ]
    assert lalm.generate(prompts, 12) == plain_generate(lalm, prompts, 12)
    head = lalm.model.get_submodule(lalm.edit_sites.lm_head)
    assert not head._forward_pre_hooks  # no hook is left behind

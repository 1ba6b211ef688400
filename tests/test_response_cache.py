"""The cache of the unedited model's answers keys on everything that decides an answer."""

import pytest
import torch
import transformers

from evaluation.responses import ResponseCache

CHANGES = {
    "the model's generation config": lambda mp, lalm: mp.setattr(
        lalm.model.generation_config, "repetition_penalty", 1.3
    ),
    "clean_up_tokenization_spaces": lambda mp, lalm: mp.setattr(
        lalm.tokenizer, "clean_up_tokenization_spaces", not lalm.tokenizer.clean_up_tokenization_spaces
    ),
    "the chat template": lambda mp, lalm: mp.setattr(lalm, "template", lalm.template + "{# v2 #}"),
    "the system prompt": lambda mp, lalm: mp.setattr(lalm, "system_prompt", "Answer briefly."),
    "the transformers version": lambda mp, lalm: mp.setattr(transformers, "__version__", "0.0.1"),
    "the torch version": lambda mp, lalm: mp.setattr(torch, "__version__", "0.0.1"),
}


def test_every_setting_that_decides_an_answer_misses_the_cache(shipped_lalm, tmp_path):
    path = tmp_path / "responses.sqlite"
    before = shipped_lalm.answers_fingerprint()
    ResponseCache(path, before).put({"query": "a cat"})
    for name, change in CHANGES.items():
        with pytest.MonkeyPatch.context() as mp:
            change(mp, shipped_lalm)
            now = shipped_lalm.answers_fingerprint()
            assert now != before, name
            assert ResponseCache(path, now).get(["query"]) == {}, name
    assert shipped_lalm.answers_fingerprint() == before  # all undone: the cached answer is found again
    assert ResponseCache(path, before).get(["query"]) == {"query": "a cat"}


def test_the_decoding_record_is_what_generate_uses(shipped_lalm):
    used = shipped_lalm.generation_config(7).to_dict()
    recorded = shipped_lalm.decoding()["generation"]
    assert {k: v for k, v in used.items() if k not in ("max_new_tokens", "transformers_version")} == recorded
    assert recorded["do_sample"] is False and recorded["num_beams"] == 1

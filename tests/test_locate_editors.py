"""ROME (LLM, audio encoder, cross-modal), AlphaEdit and OT steering on the shipped tiny LALM,
built from the configs evaluate.py composes (with a smaller key corpus)."""

import pytest
import torch

from common.prompt import Prompt
from editors.locate import KeyCorpus, LinearSite, key_positions, second_moment
from editors.steering import monge_map
from evaluation.sweep import request
from tests.helpers import configured

CORPUS = ("editor.hparams.corpus.text=20", "editor.hparams.corpus.audio=10")


def located(name, lalm, pool, cache_dir, *overrides):
    cache = (
        f"editor.hparams.corpus.cache_dir={cache_dir}"
        if cache_dir
        else "editor.hparams.corpus.cache_dir=null"
    )
    return configured(name, lalm, pool, *CORPUS, cache, *overrides)


def snapshot(lalm):
    return {n: p.detach().clone() for n, p in lalm.model.named_parameters()}


def changed(lalm, before):
    return sorted(n for n, p in lalm.model.named_parameters() if not torch.equal(p, before[n]))


def test_keys_are_read_at_the_last_prompt_position_or_the_audio_rows(shipped_lalm, samples):
    s = samples[0]
    batch = shipped_lalm.encode([s.prompt], [s.truth])
    last = key_positions(shipped_lalm, batch, "llm", "last", 0)[0]
    first_answer = int((batch["labels"][0] != -100).nonzero()[0])
    assert last.nonzero().flatten().tolist() == [first_answer - 1]  # not the end of the answer
    audio = key_positions(shipped_lalm, batch, "llm", "audio", 0)[0]
    rows = (batch["input_ids"][0] == shipped_lalm.audio_token_id).nonzero().flatten()
    assert torch.equal(audio.nonzero().flatten(), rows) and audio.sum() == pytest.approx(1.0)


def test_the_second_moment_is_cached_per_model_layer_and_corpus(shipped_lalm, pool, tmp_path):
    site = LinearSite(shipped_lalm, "llm.layers.2.mlp.down_proj", "last")
    corpus = KeyCorpus(6, 2, str(tmp_path))
    c = second_moment(shipped_lalm, site, pool, corpus)
    assert c.shape == (384, 384) and torch.allclose(c, c.T) and len(list(tmp_path.iterdir())) == 1
    again = second_moment(shipped_lalm, site, pool, corpus)
    assert torch.equal(c, again)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6  # positive semi-definite
    other = second_moment(shipped_lalm, site, pool, KeyCorpus(5, 2, str(tmp_path)))  # another corpus
    assert len(list(tmp_path.iterdir())) == 2 and not torch.equal(other, c)


@pytest.mark.parametrize(
    ("name", "layers"),
    [("rome", ["editor.layer=2"]), ("rome_audio", []), ("rome_cross", ["editor.layer=2"])],
    ids=["llm", "audio", "cross"],
)
def test_rome_is_a_rank_one_update_of_its_sites_and_undoes_bitwise(
    shipped_lalm, pool, samples, name, layers, tmp_path
):
    rome = located(name, shipped_lalm, pool, tmp_path, *layers)
    before = snapshot(shipped_lalm)
    s = samples[1]
    handle = rome.apply(request(s.instance, s.prompt))
    touched = changed(shipped_lalm, before)
    assert touched == sorted(site.param for site in rome.sites)
    for name in touched:
        dw = dict(shipped_lalm.model.named_parameters())[name] - before[name]
        assert torch.linalg.matrix_rank(dw.double(), rtol=1e-6) == 1
    handle.undo()
    assert not changed(shipped_lalm, before)


def test_rome_edits_the_answer_on_the_llm(shipped_lalm, pool, samples, tmp_path):
    rome = located("rome", shipped_lalm, pool, tmp_path)  # the tiny model's layer 1
    answers = []
    for s in samples[:4]:  # gender, emotion, language, animal
        handle = rome.apply(request(s.instance, s.prompt))
        answers.append((shipped_lalm.generate([s.prompt], 8)[0], s.instance.target))
        handle.undo()
    assert all(a == t for a, t in answers), answers


def test_alphaedit_updates_lie_in_the_null_space_and_sequences_accumulate(
    shipped_lalm, pool, samples, tmp_path
):
    editor = located("alphaedit", shipped_lalm, pool, tmp_path)  # layers 1 and 2
    before = snapshot(shipped_lalm)
    first = editor.apply(request(samples[1].instance, samples[1].prompt))
    params = dict(shipped_lalm.model.named_parameters())
    for site in editor.sites:
        dw = (params[site.param] - before[site.param]).float()
        p = editor.projection(site)
        assert torch.allclose(
            dw @ p, dw, atol=1e-5
        )  # rows of dW^T live in P's range: preserved keys untouched
    assert set(editor.previous) == {s.path for s in editor.sites}
    c1 = {k: v.clone() for k, v in editor.previous.items()}
    second = editor.apply(request(samples[2].instance, samples[2].prompt))
    assert all(not torch.equal(editor.previous[k], c1[k]) for k in c1)
    second.undo()
    assert all(torch.equal(editor.previous[k], c1[k]) for k in c1)
    first.undo()
    assert editor.previous == {} and not changed(shipped_lalm, before)


def test_the_monge_map_carries_one_gaussian_onto_the_other():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.double)
    c_s, c_t = (
        m @ m.T + torch.eye(6, dtype=torch.double),
        torch.diag(torch.arange(1.0, 7.0, dtype=torch.double)),
    )
    mu_s, mu_t = (
        torch.randn(6, generator=g, dtype=torch.double),
        torch.randn(6, generator=g, dtype=torch.double),
    )
    a, b = monge_map(mu_s, c_s, mu_t, c_t)
    assert (
        torch.allclose(a, a.T, atol=1e-8) and torch.linalg.eigvalsh(a).min() > 0
    )  # a gradient of a convex map
    assert torch.allclose(a @ c_s @ a.T, c_t, atol=1e-6) and torch.allclose(a @ mu_s + b, mu_t)


def test_steering_routes_each_sample_and_undo_removes_it(shipped_lalm, pool, samples):
    steering = configured("steering", shipped_lalm, pool, "editor.hparams.samples=16")
    s, other = samples[3], samples[4 + 1]  # an animal clip; an emotion clip
    batch = [s.prompt, other.prompt, Prompt("What is two plus three?")]
    unedited = shipped_lalm.generate(batch, 8)
    handle = steering.apply(request(s.instance, s.prompt))
    assert steering.routed(batch).tolist() == [True, False, False]
    edited = shipped_lalm.generate(batch, 8)
    assert unedited[0] != s.instance.target and edited[0] == s.instance.target  # the edit itself
    assert edited[1:] == unedited[1:]  # outside the source region: untouched
    assert shipped_lalm.generate([s.prompt], 8) == edited[:1]  # alone or batched, the same decision
    handle.undo()
    assert shipped_lalm.generate(batch, 8) == unedited and steering._hook is None


def test_key_statistics_come_from_the_unedited_model(shipped_lalm, pool, samples):
    """AlphaEdit's null spaces and cross-modal ROME's C^-1 after a few edits equal those of a
    fresh editor on the unedited model (each layer's, not computed after a lower one changed)."""
    alpha = located("alphaedit", shipped_lalm, pool, None)
    handles = [alpha.apply(request(s.instance, s.prompt)) for s in samples[1:3]]
    for h in reversed(handles):
        h.undo()
    fresh = located("alphaedit", shipped_lalm, pool, None)
    for site in alpha.sites:
        assert torch.equal(alpha._projections[site.path], fresh.projection(site)), site.path
    rome = located("rome_cross", shipped_lalm, pool, None, "editor.layer=2")
    rome.apply(request(samples[1].instance, samples[1].prompt)).undo()
    again = located("rome_cross", shipped_lalm, pool, None, "editor.layer=2")
    for site in rome.sites:
        assert torch.equal(rome._inverse[site.path], again.inverse_moment(site)), site.path

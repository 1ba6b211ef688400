"""ROME (LLM, audio encoder, cross-modal), AlphaEdit and OT steering on the shipped tiny LALM."""

import pytest
import torch

from editors.alphaedit import AlphaEdit
from editors.locate import Site, key_positions, second_moment
from editors.rome import ROME
from editors.steering import OTSteering, monge_map
from evaluation.sweep import request
from lalms.prompt import Prompt

COMMON = dict(
    corpus_text=20, corpus_audio=10, prefixes=[""], steps=50, clamp_norm=12.0, neutral_question=None
)


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


def test_the_second_moment_is_cached_per_model_and_layer(shipped_lalm, mini_dir, tmp_path):
    site = Site(shipped_lalm, "llm.layers.2.mlp.down_proj")
    c = second_moment(shipped_lalm, site, str(mini_dir), None, 6, 2, str(tmp_path))
    assert c.shape == (384, 384) and torch.allclose(c, c.T) and len(list(tmp_path.iterdir())) == 1
    again = second_moment(shipped_lalm, site, str(mini_dir), None, 6, 2, str(tmp_path))
    assert torch.equal(c, again)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6  # positive semi-definite


@pytest.mark.parametrize(
    "sites",
    [
        ["llm.layers.2.mlp.down_proj"],
        ["audio.layers.-1.fc2"],
        ["audio.layers.-1.fc2", "llm.layers.2.mlp.down_proj"],
    ],
    ids=["llm", "audio", "cross"],
)
def test_rome_is_a_rank_one_update_of_its_sites_and_undoes_bitwise(
    shipped_lalm, mini_dir, samples, sites, tmp_path
):
    rome = ROME(shipped_lalm, sites, str(mini_dir), cache_dir=str(tmp_path), **COMMON)
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


def test_rome_edits_the_answer_on_the_llm(shipped_lalm, mini_dir, samples, tmp_path):
    rome = ROME(
        shipped_lalm, ["llm.layers.1.mlp.down_proj"], str(mini_dir), cache_dir=str(tmp_path), **COMMON
    )
    answers = []
    for s in samples[:4]:  # gender, emotion, language, animal
        handle = rome.apply(request(s.instance, s.prompt))
        answers.append((shipped_lalm.generate([s.prompt], 8)[0], s.instance.target))
        handle.undo()
    assert all(a == t for a, t in answers), answers


def test_alphaedit_updates_lie_in_the_null_space_and_sequences_accumulate(
    shipped_lalm, mini_dir, samples, tmp_path
):
    editor = AlphaEdit(shipped_lalm, [1, 2], str(mini_dir), cache_dir=str(tmp_path), **COMMON)
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


def test_steering_routes_each_sample_and_undo_removes_it(shipped_lalm, mini_dir, samples):
    steering = OTSteering(shipped_lalm, str(mini_dir), samples=16)
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


def test_key_statistics_come_from_the_unedited_model(shipped_lalm, mini_dir, samples, tmp_path):
    """AlphaEdit's null spaces and cross-modal ROME's C^-1 after a few edits equal those of a
    fresh editor on the unedited model (each layer's, not computed after a lower one changed)."""
    alpha = AlphaEdit(shipped_lalm, [1, 2], str(mini_dir), cache_dir=None, **COMMON)
    handles = [alpha.apply(request(s.instance, s.prompt)) for s in samples[1:3]]
    for h in reversed(handles):
        h.undo()
    fresh = AlphaEdit(shipped_lalm, [1, 2], str(mini_dir), cache_dir=None, **COMMON)
    for site in alpha.sites:
        assert torch.equal(alpha._projections[site.path], fresh.projection(site)), site.path
    sites = ["audio.layers.-1.fc2", "llm.layers.2.mlp.down_proj"]
    rome = ROME(shipped_lalm, sites, str(mini_dir), cache_dir=None, **COMMON)
    rome.apply(request(samples[1].instance, samples[1].prompt)).undo()
    again = ROME(shipped_lalm, sites, str(mini_dir), cache_dir=None, **COMMON)
    for site in rome.sites:
        assert torch.equal(rome._inverse[site.path], again.inverse_moment(site)), site.path

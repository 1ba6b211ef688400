"""Attention knockout (lalms/attention.py, analysis/knockout.py, `analyze.py knockout`): a blocked
source no longer reaches the predicting position, an empty block changes nothing, and the
analysis writes its tables and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from analysis.knockout import SOURCES, Knockout, layer_windows, occurrences, window_size
from analysis.probes import Prober, spelled_labels
from common.prompt import Prompt
from datamodules.schema import SAKE_LABELS, norm_label
from lalms.attention import blocked_attention, knocked_out, llm_layers
from lalms.base import hidden
from lalms.hooks import Hook, hooked, hooked_all
from tests.test_analysis import run_cli

ROOT = Path(__file__).resolve().parents[1]
PROBES = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "probes" / "sake.yaml"))


def prompts(clips, rows: int) -> list[Prompt]:
    """`rows` audio questions of different lengths (two rows: left padding, a bool mask)."""
    tone, noise = clips
    texts = ["What is the emotion of the speaker?", "Which animal makes this sound, if any?"]
    return [Prompt(t, a, sampling_rate=16000) for t, a in zip(texts[:rows], (tone, noise), strict=False)]


# ------------------------------------------------------------------ the mask
def test_knocked_out_masks_of_every_kind_leave_the_given_mask_alone():
    states = torch.zeros(2, 4, 8)
    blocked = torch.tensor([[False, True, False, False], [False, False, True, False]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    bool_mask = causal[None, None].repeat(2, 1, 1, 1)
    before = bool_mask.clone()
    new = knocked_out(bool_mask, blocked, states)
    assert torch.equal(bool_mask, before) and new.data_ptr() != bool_mask.data_ptr()
    assert new[0, 0, -1].tolist() == [True, False, True, True]
    assert new[1, 0, -1].tolist() == [True, True, False, True]
    assert torch.equal(new[:, :, :-1], bool_mask[:, :, :-1])  # the other queries attend as before
    low = torch.finfo(torch.float32).min
    float_mask = torch.zeros(1, 1, 4, 4).masked_fill(~causal, low)  # batch broadcast
    new = knocked_out(float_mask, blocked, states)
    assert new.shape == (2, 1, 4, 4) and float_mask[0, 0, -1].eq(0).all()
    assert torch.equal(new[..., -1, :] == low, blocked[:, None])
    # no mask (transformers skips it without padding): a causal one of the states' dtype
    new = knocked_out(None, blocked, states.double())
    assert new.dtype == torch.float64 and torch.equal(
        new[:, 0, :-1] == 0, causal[None, :-1].expand(2, -1, -1)
    )
    assert torch.equal(new[:, 0, -1] == 0, ~blocked)


def test_knocked_out_refuses_what_it_cannot_block():
    states = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match="flash-attention"):
        knocked_out(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool), states)
    with pytest.raises(ValueError, match="no key to attend to"):
        knocked_out(None, torch.ones(1, 3, dtype=torch.bool), states)
    with pytest.raises(ValueError, match="bool tensor"):
        knocked_out(None, torch.zeros(1, 3), states)


def test_windows_and_token_subsequences():
    assert window_size(32, 0.2) == 6 and window_size(4, 0.2) == 1 and window_size(4, 1.0) == 4
    assert [list(w) for w in layer_windows(5, 2)] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert occurrences([5, 1, 2, 1, 2, 7], [1, 2]) == [1, 3] and occurrences([1, 2], []) == []
    with pytest.raises(ValueError, match="window_fraction"):
        window_size(4, 0.0)


# ------------------------------------------------------------------ every family
@pytest.mark.parametrize("rows", [1, 2], ids=["no-mask", "padded"])
def test_a_blocked_source_does_not_reach_the_last_position(lalm, clips, rows):
    """At a blocked layer, the last position's output does not depend on the blocked inputs
    (gradient exactly zero there), and still does on every other real position."""
    batch = lalm.encode(prompts(clips, rows))
    audio = batch["input_ids"] == lalm.audio_token_id
    real = batch["attention_mask"].bool()
    layer = llm_layers(lalm)[1]
    seen = {}

    def leaf(m, args, kwargs):
        seen["x"] = args[0].detach().requires_grad_(True)
        return (seen["x"], *args[1:]), kwargs

    def grad_at_inputs(block: bool) -> torch.Tensor:
        hooks = [Hook(layer, leaf, pre=True, with_kwargs=True),
                 Hook(layer, lambda m, a, out: seen.update(out=hidden(out)), stop=True)]  # fmt: skip
        with hooked_all(hooks), blocked_attention(lalm, [1] if block else [], audio), torch.enable_grad():
            lalm.logits(batch)  # ends after `layer`
        seen["out"][:, -1].sum().backward()
        return seen["x"].grad.abs().sum(-1)

    g = grad_at_inputs(block=True)
    assert (g[audio] == 0).all()
    assert (g[real & ~audio] > 0).all()
    assert (grad_at_inputs(block=False)[audio] > 0).all()


def test_an_empty_block_changes_nothing_and_the_shared_mask_is_never_written(lalm, clips):
    batch = lalm.encode(prompts(clips, 2))
    every = range(lalm.edit_sites.num_llm_layers)
    with torch.no_grad():
        clean = lalm.logits(batch)
        with blocked_attention(lalm, every, torch.zeros_like(batch["input_ids"], dtype=torch.bool)):
            assert torch.equal(lalm.logits(batch), clean)
        given = {}

        def keep(m, args, kwargs):  # registered first: sees the mask the model passes every layer
            given.setdefault("mask", kwargs["attention_mask"])
            given.setdefault("copy", kwargs["attention_mask"].clone())

        only_row0 = batch["input_ids"] == lalm.audio_token_id
        only_row0[1] = False
        with (
            hooked(llm_layers(lalm)[0], keep, pre=True, with_kwargs=True),
            blocked_attention(lalm, every, only_row0),
        ):
            blocked = lalm.logits(batch)
    assert torch.equal(given["mask"], given["copy"])
    assert not torch.equal(blocked[0, -1], clean[0, -1])
    assert torch.equal(blocked[1], clean[1])  # a row without a block is computed as before


def test_blocked_attention_names_missing_layers(lalm):
    with pytest.raises(ValueError, match="do not exist"):
        with blocked_attention(lalm, [lalm.edit_sites.num_llm_layers], torch.zeros(1, 2, dtype=torch.bool)):
            pass


# ------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def prober(shipped_lalm, samples):
    return Prober.from_config(
        shipped_lalm, PROBES, spelled_labels(SAKE_LABELS, [s.instance for s in samples])
    )


def test_labels_are_read_as_the_data_spells_them(shipped_lalm, prober, samples):
    language = next(s for s in samples if s.instance.attribute == "language")
    assert (
        norm_label(language.truth) in SAKE_LABELS["language"] and language.truth in prober.labels["language"]
    )
    probe = prober.probe(language, "sake")
    assert prober.label_ids(probe)[prober.right(probe)] == shipped_lalm.tokenizer(language.truth).input_ids[0]
    assert spelled_labels({"gender": ("male", "female")}, []) == {"gender": ("male", "female")}


def test_source_sets_of_a_batch(shipped_lalm, prober, samples):
    ko = Knockout(shipped_lalm, prober)
    probes = [prober.probe(s, "reversed") for s in samples[:2]] + [prober.probe(samples[-1], "sake")]
    batch = prober.encode(probes)
    sets = ko.source_sets(probes, batch)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    tok = shipped_lalm.tokenizer
    for b, probe in enumerate(probes):
        audio = (ids[b] == shipped_lalm.audio_token_id).nonzero().flatten()
        first, last, start = int(audio[0]), int(audio[-1]), int(real[b].nonzero()[0])
        assert torch.equal(sets["audio"][b], ids[b] == shipped_lalm.audio_token_id)
        assert sets["text"][b].nonzero().flatten().tolist() == list(range(last + 1, ids.shape[1] - 1))
        assert sets["scaffolding"][b].nonzero().flatten().tolist() == list(range(start + 1, first))
        word = prober.phrasing(probe.attribute).word
        named = tok.decode(ids[b][sets["attribute"][b]]).strip()
        if probe.variant == "reversed":  # the reply names it
            assert named.replace(" ", "") == word
        assert not (sets["attribute"][b] & ~sets["text"][b]).any()
    assert not any(s[:, -1].any() for s in sets.values())  # the predicting position keeps itself


def test_knocking_out_the_audio_at_every_layer_moves_the_answer(shipped_lalm, prober, samples):
    ko = Knockout(shipped_lalm, prober, ["audio", "scaffolding"], window_fraction=1.0)
    assert [list(w) for w in ko.windows] == [list(range(shipped_lalm.edit_sites.num_llm_layers))]
    probes = [prober.probe(s, "sake") for s in samples]
    records, left_out = ko.knock(probes, [prober.right(p) for p in probes])
    assert left_out == {"audio": 0, "scaffolding": 0}
    audio = [r for r in records if r["source"] == "audio"]
    assert len(audio) == len(probes)
    assert max(abs(r["p_blocked"] - r["p_clean"]) for r in audio) > 0.05


def test_eager_attention_gives_the_knockout_sdpa_gives(shipped_lalm, prober, samples):
    """The float (eager) and bool / no-mask (sdpa) paths block the same edges."""
    ko = Knockout(shipped_lalm, prober, SOURCES)
    probes = [prober.probe(s, "question") for s in samples[:3]]
    rights = [prober.right(p) for p in probes]
    sdpa = ko.knock(probes, rights)
    single = ko.knock(probes[:1], rights[:1])  # one row: no mask under sdpa
    shipped_lalm.model.set_attn_implementation("eager")
    try:
        eager, eager_single = ko.knock(probes, rights), ko.knock(probes[:1], rights[:1])
    finally:
        shipped_lalm.model.set_attn_implementation("sdpa")
    for a, b in ((sdpa, eager), (single, eager_single)):
        assert a[1] == b[1]
        assert [r["p_blocked"] for r in a[0]] == pytest.approx([r["p_blocked"] for r in b[0]], abs=1e-5)


# ------------------------------------------------------------------ the command
def test_analyze_knockout_writes_its_tables_and_plots(mini_dir, tmp_path):
    out = tmp_path / "knockout"
    data = [f"data.root={mini_dir}", "data.build_mini=false"]
    edits = ["editor=ft_llm", "analysis.run.edits=1"]
    run_cli("analyze.py", "knockout", *data, "analysis.run.samples=2", *edits, f"hydra.run.dir={out}")
    info = json.loads((out / "knockout.json").read_text())
    layers = info["layers"]
    assert info["window"] == max(1, round(0.2 * layers)) and info["variant"] == "sake"
    assert set(info["definitions"]) >= set(SOURCES) and "Geva" in info["method"]
    assert set(info["left_out"]) == set(SOURCES) and info["samples"] == 8
    with open(out / "knockout.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["source", "window_start", "window_end", "samples", "p_clean", "p_blocked",
                             "change_pct", "accuracy_clean", "accuracy_blocked"]  # fmt: skip
    windows = layers - info["window"] + 1
    assert [r["source"] for r in rows if r["source"] != "attribute"] == [
        s for s in SOURCES if s != "attribute" for _ in range(windows)
    ]
    assert all(int(r["samples"]) == 8 for r in rows if r["source"] != "attribute")
    assert all(
        int(r["samples"]) == 8 - info["left_out"]["attribute"] for r in rows if r["source"] == "attribute"
    )
    for r in rows:
        p_clean, p_blocked = float(r["p_clean"]), float(r["p_blocked"])
        assert float(r["change_pct"]) == pytest.approx(100 * (p_blocked - p_clean) / p_clean, abs=0.01)
        assert 0 <= float(r["accuracy_blocked"]) <= 1
    assert info["edit"]["edits"] == 4 and len(info["edit"]["rows"]) == len(rows)
    with open(out / "knockout_edit.csv", encoding="utf-8") as f:
        edit = list(csv.DictReader(f))
    assert {"p_clean_before", "p_blocked_before", "p_clean_after", "p_blocked_after"} <= set(edit[0])
    # after: p of the target with the edit in effect (FT fits the edit prompt, the `sake` probe)
    assert all(float(r["p_clean_after"]) > 0.9 and float(r["accuracy_clean_after"]) == 1 for r in edit)
    assert all((out / f).is_file() for f in ("knockout.png", "knockout_edit.png"))

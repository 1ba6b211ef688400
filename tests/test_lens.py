"""The logit lens as AudioLens reads it (analysis/lens.py, analysis/probes.py): probes and their
prefilled replies, label tokens in context, the critical layer and its correlation, the CLI."""

import json

import numpy as np
import pytest
import torch
import yaml

from analysis.lens import Lens, correlation, correlations, critical_layer, critical_layers, curves
from analysis.probes import VARIANTS, Prober, leads, share
from datamodules.schema import SAKE_LABELS
from tests.test_analysis import ROOT, run_cli

PROBES = yaml.safe_load((ROOT / "configs" / "probes" / "sake.yaml").read_text())


@pytest.fixture(scope="module")
def prober(shipped_lalm):
    return Prober.from_config(shipped_lalm, PROBES, SAKE_LABELS)


def test_the_critical_layer_of_a_hand_made_curve():
    # |Y| = 2, alpha = 0.2: the bar is 0.6; weights 0, 0, 0.3, 0.4 on layers 0..3
    assert critical_layer([0.2, 0.5, 0.9, 1.0], 2, 0.2) == pytest.approx((2 * 0.3 + 3 * 0.4) / 0.7)
    # |Y| = 5: the bar is 0.24; weights 0.06, 0, 0.56 on layers 0..2
    assert critical_layer([0.3, 0.1, 0.8], 5, 0.2) == pytest.approx((0 * 0.06 + 2 * 0.56) / 0.62)
    assert critical_layer([0.5, 0.6, 0.6], 2, 0.2) is None  # never above the bar
    assert critical_layer([0.5, 0.6, 0.61], 2, 0.0) == pytest.approx((1 * 0.1 + 2 * 0.11) / 0.21)


def test_correlations_with_p_values_and_undefined_cases():
    c = correlation([1.0, 2.0, 3.0, 4.0], [0.9, 0.7, 0.8, 0.1])
    assert c["points"] == 4 and c["spearman"] == pytest.approx(-0.8)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.9, 0.7, 0.8, 0.1])
    r = ((x - x.mean()) * (y - y.mean())).sum() / np.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum()
    )
    assert c["pearson"] == pytest.approx(r, abs=1e-4) and 0 < c["pearson_p"] < 1
    assert correlation([1.0, 2.0], [0.5, 0.7])["pearson"] is None  # two points say nothing
    assert correlation([1.0, 1.0, 1.0], [0.5, 0.7, 0.1])["spearman"] is None  # a constant series
    crit = {
        "sake@last": {a: {"critical_layer": float(i), "accuracy": 1 - i / 10} for i, a in enumerate("abcd")}
    }
    other = {"m2": {"sake@last": {"a": {"critical_layer": 9.0, "accuracy": 0.0}}}}
    pooled = correlations(crit, other)["sake@last"]
    assert pooled["attributes"]["points"] == 4 and pooled["attributes"]["pearson"] == pytest.approx(-1.0)
    assert pooled["models_and_attributes"]["points"] == 5


def test_leads_and_share_treat_shared_first_tokens_as_one():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    assert bool(leads(p, 0, [7, 8, 9, 10])) and not bool(leads(p, 1, [7, 8, 9, 10]))
    assert float(share(p, 0, [7, 8, 9, 10])) == pytest.approx(0.5)
    q = torch.tensor([0.2, 0.4, 0.4, 0.0])  # labels 1 and 2 start with the same token (one probability)
    assert bool(leads(q, 1, [7, 8, 8, 10])) and not bool(leads(q, 1, [7, 8, 9, 10]))  # 2 is no rival of 1
    assert float(share(q, 1, [7, 8, 8, 10])) == pytest.approx(0.4 / 0.6)  # the shared token counted once


def test_label_tokens_in_context_and_bare(shipped_lalm, prober):
    tok = shipped_lalm.tokenizer
    bare = Prober.from_config(shipped_lalm, {**PROBES, "label_tokens": "bare"}, SAKE_LABELS)
    prefill = "The speaker's emotion is"
    assert tok.decode([prober.label_token("", "happy")]) == "happy"  # the reply starts with it
    in_context = prober.label_token(prefill, "happy")
    assert tok.decode([in_context]).startswith(" ")  # after "is" the label comes with its space
    assert tok(f"{prefill} happy", add_special_tokens=False).input_ids[-2] == in_context
    assert bare.label_token(prefill, "happy") == prober.label_token("", "happy") != in_context


def test_labels_that_share_their_first_token_are_read_past_it(shipped_lalm, prober):
    """The tiny tokenizer knows the language names only bare: after "is" each one is a lone space
    token and the name, so the reply is prefilled through the space and the names read after it
    (each its own token); emotions differ at their first token and are read there."""
    tok = shipped_lalm.tokenizer
    stem = "The speech's spoken language is"
    languages = ["English", "German", "Korean"]
    assert len({prober.continuation(stem, lab)[0] for lab in languages}) == 1  # all the same token
    restricted = Prober(shipped_lalm, PROBES["phrasings"], {"language": languages})
    lead = restricted.shared_lead(stem, "language")
    assert lead.strip() == "" and lead != ""
    ids = [restricted.label_token(stem, lab, lead) for lab in languages]
    assert [tok.decode([i]).strip() for i in ids] == languages
    assert prober.shared_lead("The speaker's emotion is", "emotion") == ""
    bare = Prober(shipped_lalm, PROBES["phrasings"], {"language": languages}, label_tokens="bare")
    assert bare.shared_lead(stem, "language") == ""  # the reference's reading, unchanged


def test_probes_encode_their_prefilled_reply_and_read_their_positions(shipped_lalm, prober, samples):
    s = samples[0]
    sake = prober.probe(s, "sake")
    plain = shipped_lalm.encode([s.prompt])
    enc = prober.encode([sake])
    assert torch.equal(enc["input_ids"], plain["input_ids"]) and torch.equal(
        enc["attention_mask"], plain["attention_mask"]
    )
    for variant in VARIANTS[1:]:
        probe = prober.probe(s, variant)
        ids = prober.encode([probe])["input_ids"][0].tolist()
        prefill = prober.ids(probe.prefill)
        assert ids[-len(prefill) :] == prefill, variant  # the reply is begun, the turn left open
        for name, k in probe.reads:
            if name == "attribute":  # the attribute word's (last) token
                word = prober.phrasing(s.instance.attribute).word
                assert shipped_lalm.tokenizer.decode(ids[k : len(ids) + k + 1]).strip().endswith(word)


def test_the_lens_at_the_last_layer_is_the_models_own_output(shipped_lalm, prober, samples):
    """Hooks take the layer outputs before the final norm, so the last layer's lens distribution
    equals the model's next-token distribution (a double norm would not), in every variant."""
    for variant in ("sake", "reversed"):
        probes = [
            prober.probe(s, variant)
            for s in samples[:4]
            if s.instance.attribute == samples[0].instance.attribute
        ]
        probs = prober.read(probes, [k for _, k in probes[0].reads])
        assert probs.shape[:3] == (len(probes), len(probes[0].reads), shipped_lalm.edit_sites.num_llm_layers)
        with torch.no_grad():
            own = (
                shipped_lalm.logits(shipped_lalm.to_device(prober.encode(probes)))[:, -1].float().softmax(-1)
            )
        assert torch.allclose(probs[:, 0, -1], own, atol=1e-5)


def test_readings_split_into_recognised_and_not(prober, samples):
    lens = Lens(prober, batch_size=2)
    readings = []
    for attribute in SAKE_LABELS:
        readings += lens.readings(
            [prober.probe(s, "sake") for s in samples if s.instance.attribute == attribute]
        )
    for r in readings:  # recognised = the label leads at the last layer of the predicting position
        assert r.recognised == bool(r.leads[-1])
        assert np.all((r.share >= 0) & (r.share <= 1))
    rows = curves(readings)
    for attribute in SAKE_LABELS:
        mine = [r for r in rows if r["attribute"] == attribute and r["layer"] == 3]
        by = {r["group"]: r for r in mine}
        assert by["all"]["samples"] == sum(by[g]["samples"] for g in ("correct", "incorrect") if g in by)
        assert by.get("correct", {"information_score": 1.0})["information_score"] == 1.0
        assert by.get("incorrect", {"information_score": 0.0})["information_score"] == 0.0
    crit = critical_layers(readings, 0.2)["sake@last"]
    assert set(crit) == set(SAKE_LABELS)
    assert all(v["critical_layer"] is None or 0 <= v["critical_layer"] <= 3 for v in crit.values())


def test_analyze_lens_writes_scores_critical_layers_and_edits(mini_dir, tmp_path):
    out = tmp_path / "lens"
    run_cli("analyze.py", "lens", f"data.root={mini_dir}", "data.build_mini=false", "analysis.run.samples=3",
            "editor=ft_llm", "analysis.run.edits=1", f"hydra.run.dir={out}")  # fmt: skip
    summary = json.loads((out / "lens.json").read_text())
    assert "critical_layer" in summary["header"] and summary["header"]["alpha"] == 0.2
    keys = {f"{v}@last" for v in VARIANTS} | {"reversed@attribute"}
    assert set(summary["critical"]) == keys == set(summary["correlation"])
    assert all(set(v) == set(SAKE_LABELS) for v in summary["critical"].values())
    assert summary["correlation"]["sake@last"]["attributes"]["points"] <= 4
    assert summary["edit"]["edits"] == 4 and {r["variant"] for r in summary["edit"]["per_layer"]} == set(
        VARIANTS
    )
    assert all((out / f).is_file() for f in ("lens.csv", "lens.png", "lens_edit.csv", "lens_edit.png"))
    header = (out / "lens.csv").read_text().splitlines()[0]
    assert header == "variant,position,attribute,group,layer,samples,information_score,p_right,share"
    # pooled with another run: its points join the correlation across models
    again = tmp_path / "again"
    only_sake = ["analysis.run.variants=[sake]", f"analysis.run.compare=[{out}]", f"hydra.run.dir={again}"]
    run_cli("analyze.py", "lens", f"data.root={mini_dir}", "data.build_mini=false", "analysis.run.samples=3",
            *only_sake)  # fmt: skip
    pooled = json.loads((again / "lens.json").read_text())["correlation"]["sake@last"]
    assert pooled["models_and_attributes"]["points"] == 2 * pooled["attributes"]["points"]

"""AudioLens's enhancement (lalms/enhancement.py, analysis/enhance.py): it changes exactly the
hidden states it claims, in the prefill only, equals AudioLens's two-pass computation, leaves the
model bitwise as it was when undone, is a setting of the model (fingerprints, cached answers, run
folders), and `analyze.py enhance` / `evaluate.py editor=none enhancement=...` run on SAKE-mini."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from analysis.enhance import MEAN, choose, grid, relative_gain
from cli.config import enhancement_tag, model_enhancement
from common.prompt import Prompt
from evaluation.identity import result_config
from evaluation.responses import ResponseCache
from lalms.base import hidden, with_hidden
from lalms.enhancement import Enhancement
from lalms.hooks import Hooks
from tests.helpers import composed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts():
    """Two prompts of different lengths (the shorter one left padded), each with a clip."""
    rng = np.random.default_rng(0)
    clip = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    return [
        Prompt("What is the gender of the speaker in the speech?", clip(16000), sampling_rate=16000),
        Prompt("Which animal?", clip(12000), sampling_rate=16000),
    ]


def layer(lalm, i):
    return lalm.model.get_submodule(f"{lalm.edit_sites.llm_layers}.{i}")


def outputs(lalm, batch) -> list[torch.Tensor]:
    """Every LLM layer's output hidden states on `batch` (hooks added after any enhancement's,
    so they see what the next layer gets)."""
    kept: dict[int, torch.Tensor] = {}
    hooks = Hooks()
    for i in range(lalm.edit_sites.num_llm_layers):
        hooks.add(layer(lalm, i), lambda m, a, out, i=i: kept.__setitem__(i, hidden(out).detach().clone()))
    try:
        with torch.no_grad():
            lalm.logits(batch)
    finally:
        hooks.remove()
    return [kept[i] for i in range(len(kept))]


def test_the_enhancement_changes_exactly_the_hidden_states_it_claims(lalm, prompts):
    """Target layer output at the position == clean + c * clean source output there; every other
    position of it, and every layer below it, unchanged; the layer above it unchanged before the
    position (causal attention), changed from it on."""
    batch = lalm.encode(prompts)
    clean = outputs(lalm, batch)
    length = clean[0].shape[1]
    e = Enhancement(source_layer=0, target_layers=(2,), coefficient=0.75, position=-3)
    at = length - 3
    with e.apply(lalm):
        enhanced = outputs(lalm, batch)
    for i in (0, 1):
        assert torch.equal(enhanced[i], clean[i]), i
    expected = clean[2].clone()
    expected[:, at] = clean[2][:, at] + 0.75 * clean[0][:, at]
    assert torch.equal(enhanced[2], expected)
    assert not torch.equal(enhanced[2], clean[2])
    assert torch.equal(enhanced[3][:, :at], clean[3][:, :at])
    assert not torch.equal(enhanced[3][:, at:], clean[3][:, at:])


def test_one_pass_equals_audiolens_two_pass_reference(lalm, prompts):
    """AudioLens adds h_source from a separate clean run; the source lying below every target, the
    value kept in the same forward is the same (several targets, a negative layer index)."""
    batch = lalm.encode(prompts)
    n = lalm.edit_sites.num_llm_layers
    clean = outputs(lalm, batch)
    source = clean[1][:, -1].clone()  # the separate clean run's source output at the position

    def reference(m, a, out):
        h = hidden(out).clone()
        h[:, -1] = h[:, -1] + 0.5 * source
        return with_hidden(out, h)

    hooks = Hooks().add(layer(lalm, 2), reference).add(layer(lalm, n - 1), reference)
    try:
        with torch.no_grad():
            two_pass = lalm.logits(batch)
    finally:
        hooks.remove()
    with Enhancement(1, (2, -1), 0.5, -1).apply(lalm), torch.no_grad():
        one_pass = lalm.logits(batch)
    assert torch.equal(one_pass, two_pass)


def test_in_generate_only_the_prefill_is_enhanced(lalm, prompts):
    """The generation steps after the prefill (one position each, the prompt in the KV cache) see
    the target layer's own output; the prefill sees it enhanced at the position."""
    calls: list[dict] = []
    target = layer(lalm, 3)

    def before(m, a, out):
        calls.append({"before": hidden(out).detach().clone()})

    def after(m, a, out):
        calls[-1]["after"] = hidden(out).detach().clone()

    sources: list[torch.Tensor] = []
    hooks = Hooks().add(target, before)  # before the enhancement's hook: the layer's own output
    hooks.add(layer(lalm, 1), lambda m, a, out: sources.append(hidden(out).detach().clone()))
    enhanced = Enhancement(1, (3,), 2.0, -1).apply(lalm)
    hooks.add(target, after)  # after it: what the model goes on with
    try:
        lalm.generate(prompts, max_new_tokens=6)
    finally:
        enhanced.undo()
        hooks.remove()
    assert len(calls) >= 2 and calls[0]["before"].shape[1] > 1
    first = calls[0]
    expected = first["before"].clone()
    expected[:, -1] = first["before"][:, -1] + 2.0 * sources[0][:, -1]
    assert torch.equal(first["after"], expected)
    for step in calls[1:]:
        assert step["before"].shape[1] == 1
        assert torch.equal(step["after"], step["before"])


def hook_counts(lalm) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in lalm.model.named_modules()}


def test_undone_the_model_is_bitwise_as_before(shipped_lalm, prompts):
    lalm = shipped_lalm
    batch = lalm.encode(prompts)
    state = {k: v.clone() for k, v in lalm.model.state_dict().items()}
    hooks = hook_counts(lalm)
    fingerprint, answers = lalm.fingerprint(), lalm.answers_fingerprint()
    with torch.no_grad():
        plain = lalm.logits(batch)
    enhanced = Enhancement(1, (3,), 0.5).apply(lalm)
    with pytest.raises(RuntimeError, match="already enhanced"):
        Enhancement(0, (2,), 0.5).apply(lalm)
    with torch.no_grad():
        assert not torch.equal(lalm.logits(batch), plain)
    enhanced.undo()
    with torch.no_grad():
        assert torch.equal(lalm.logits(batch), plain)
    now = lalm.model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert hook_counts(lalm) == hooks  # none left behind
    assert lalm.enhancement is None and "enhancement" not in lalm.settings()
    assert (lalm.fingerprint(), lalm.answers_fingerprint()) == (fingerprint, answers)


def test_the_enhancement_is_a_setting_of_the_model(shipped_lalm, tmp_path):
    """The enhanced model has other fingerprints (its cached answers are not the plain model's);
    the same setting written with negative layers is the same setting."""
    lalm = shipped_lalm
    path = tmp_path / "responses.sqlite"
    fingerprint, answers = lalm.fingerprint(), lalm.answers_fingerprint()
    ResponseCache(path, answers).put({"query": "a cat"})
    with Enhancement(1, (3,), 0.5).apply(lalm) as on:
        assert on.enhancement == Enhancement(1, (3,), 0.5, -1)
        assert lalm.settings()["enhancement"] == {**GOOD, "position": -1}
        enhanced = (lalm.fingerprint(), lalm.answers_fingerprint())
        assert enhanced[0] != fingerprint and enhanced[1] != answers
        assert ResponseCache(path, enhanced[1]).get(["query"]) == {}
    with Enhancement(-3, (-1,), 0.5).apply(lalm):
        assert (lalm.fingerprint(), lalm.answers_fingerprint()) == enhanced
    with Enhancement(1, (3,), 0.25).apply(lalm):
        assert lalm.fingerprint() not in (fingerprint, enhanced[0])
    assert ResponseCache(path, lalm.answers_fingerprint()).get(["query"]) == {"query": "a cat"}


GOOD = {"source_layer": 1, "target_layers": [3], "coefficient": 0.5}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"source_layer": None}, "enhancement: missing source_layer"),
        ({"layer": 2}, "unknown field(s) layer"),
        ({"source_layer": 1.0}, "enhancement.source_layer: an integer"),
        ({"source_layer": True}, "enhancement.source_layer"),
        ({"target_layers": []}, "enhancement.target_layers: at least"),
        ({"target_layers": "3"}, "enhancement.target_layers: a list"),
        ({"target_layers": [3, 3]}, "listed twice"),
        ({"source_layer": 3, "target_layers": [2]}, "source_layer 3 must lie below"),
        ({"target_layers": [1, 3]}, "source_layer 1 must lie below"),
        ({"coefficient": "big"}, "enhancement.coefficient"),
        ({"coefficient": float("nan")}, "enhancement.coefficient"),
        ({"position": 0}, "enhancement.position"),
    ],
)
def test_parse_errors_name_the_field(change, says):
    mapping = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ValueError) as err:
        Enhancement.parse(mapping)
    assert says in str(err.value)


def test_settings_from_files_and_their_errors(tmp_path):
    setting = Enhancement(1, (2, 3), 0.5, -2)
    path = tmp_path / "enhancement.yaml"
    path.write_text("# chosen on val\n" + yaml.safe_dump(setting.as_dict()))
    assert Enhancement.from_config(str(path)) == setting
    assert Enhancement.from_config({"source_layer": 1, "target_layers": 3, "coefficient": 1}) == Enhancement(
        1, (3,), 1.0, -1
    )
    assert Enhancement.from_config(None) is None
    with pytest.raises(FileNotFoundError, match="enhancement=.*nowhere.yaml: no such file"):
        Enhancement.from_config(str(tmp_path / "nowhere.yaml"))
    path.write_text("source_layer: 1\ntarget_layers: [0]\ncoefficient: 0.5\n")
    with pytest.raises(ValueError, match=r"enhancement.yaml: source_layer 1 must lie below"):
        Enhancement.from_config(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="enhancement.yaml: a mapping"):
        Enhancement.from_config(str(path))
    with pytest.raises(ValueError, match="layer 4 is not one of the model's 4 LLM layers"):
        Enhancement(1, (4,), 0.5).resolved(4)
    with pytest.raises(ValueError, match=r"source_layer -1 \(= 3\) must lie below"):
        Enhancement(-1, (2,), 0.5).resolved(4)
    assert Enhancement(-4, (-2, 3), 0.5).resolved(4) == Enhancement(0, (2, 3), 0.5)


def test_the_default_changes_no_digest_and_editors_refuse_an_enhancement():
    """`enhancement: null` adds nothing to the result config (run folder digests stay what they
    were); a setting is in it by content; an editor with an enhancement is refused."""
    plain = composed("evaluate", "editor=none")
    assert "enhancement" not in result_config(plain)
    assert model_enhancement(plain) is None
    setting = "enhancement={source_layer: 1, target_layers: [3], coefficient: 0.5}"
    on = composed("evaluate", "editor=none", setting)
    assert result_config(on)["enhancement"] == {**GOOD, "position": -1}
    assert model_enhancement(on) == Enhancement(1, (3,), 0.5)
    edited = composed("evaluate", "editor=ft_llm", setting)
    with pytest.raises(ValueError, match="enhancement= is a setting of the unedited model.*editor=ft_llm"):
        model_enhancement(edited)
    # an analysis of the enhanced model gets its own folder (analyze.yaml's hydra.run.dir)
    assert enhancement_tag(_root_=composed("analyze", "analysis=lens")) == ""
    tag = enhancement_tag(_root_=composed("analyze", "analysis=lens", setting))
    other = enhancement_tag(_root_=composed("analyze", "analysis=lens", setting.replace("0.5", "2.0")))
    assert tag.startswith("-enhanced-") and other.startswith("-enhanced-") and tag != other


def test_the_grid_and_the_choice():
    points = grid([0, 2, -2], [[3], 2, [1, -1]], [0.5, 1.0], [-1], num_layers=4)
    # source 2 is not below target 2 nor [1, 3]: skipped; -2 is 2: not repeated
    pairs = [(p.source_layer, p.target_layers) for p in points[::2]]
    assert pairs == [(0, (3,)), (0, (2,)), (0, (1, 3)), (2, (3,))]
    assert [p.coefficient for p in points] == [0.5, 1.0] * 4
    with pytest.raises(ValueError, match="analysis.run.source_layers: 4 is not one of the model's 4"):
        grid([4], [[3]], [0.5], [-1], num_layers=4)
    with pytest.raises(ValueError, match="no grid point"):
        grid([3], [[1]], [0.5], [-1], num_layers=4)
    scores = [{MEAN: 0.5}, {MEAN: 0.75}, {MEAN: 0.75}, {MEAN: 0.75}]
    assert choose(points[:4], scores) == 2  # ties: the smaller coefficient, then the first
    assert relative_gain(0.5, 0.75) == 0.5 and relative_gain(0.0, 0.5) is None


def run_cli(script, *args):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    return out


def test_analyze_enhance_chooses_on_val_and_its_choice_runs_the_lens(mini_dir, tmp_path):
    data = [f"data.root={mini_dir}", "data.build_mini=false"]
    grid_ = ["analysis.run.source_layers=[0,1]", "analysis.run.target_layers=[[3],[2,3]]",
             "analysis.run.coefficients=[0.5,2.0]"]  # fmt: skip
    folder = tmp_path / "enhance"
    out = run_cli("analyze.py", "enhance", *data, "analysis.run.samples=3", *grid_, f"hydra.run.dir={folder}")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("enhance.json", "enhance_grid.csv", "enhance.csv", "enhance.png"):
        assert (folder / name).is_file(), name
    info = json.loads((folder / "enhance.json").read_text())
    points = info["grid"]["points"]
    attributes = {"animal", "emotion", "gender", "language"}
    assert len(points) == 8 and info["samples"]["val"] == dict.fromkeys(sorted(attributes), 3)
    best = max(p["val"][MEAN] for p in points)
    assert info["chosen"]["val"][MEAN] == best  # chosen on validation
    chosen = Enhancement.from_config(str(folder / "enhancement.yaml"))
    assert chosen.as_dict() == {k: info["chosen"][k] for k in chosen.as_dict()}
    assert set(info["test"]["before"]) == {*attributes, MEAN}
    lines = (folder / "enhance_grid.csv").read_text().splitlines()
    assert len(lines) == 9 and "source_layer" in lines[0]
    assert (folder / "enhance.csv").read_text().splitlines()[-1].startswith("mean,")
    assert "enhancement=" in info["commands"][0] and "editor=none" in info["commands"][0]

    setting = f"enhancement={folder / 'enhancement.yaml'}"
    lens = run_cli("analyze.py", "lens", *data, "analysis.run.samples=2", "analysis.run.variants=[sake]",
                   setting, f"hydra.run.dir={tmp_path / 'lens'}")  # fmt: skip
    assert lens.returncode == 0, lens.stderr[-3000:]
    assert "enhancement (AudioLens)" in lens.stdout + lens.stderr
    assert (tmp_path / "lens" / "lens.json").is_file()


def test_evaluate_editor_none_with_an_enhancement_is_another_run_with_its_own_answers(mini_dir, tmp_path):
    cache = tmp_path / "cache.sqlite"
    common = [f"data.root={mini_dir}", "data.build_mini=false", "data.max_instances=4", "max_new_tokens=4",
              f"response_cache={cache}", "editor=none"]  # fmt: skip
    runs = tmp_path / "runs"
    setting = "enhancement={source_layer: 0, target_layers: [3], coefficient: 2.0}"
    for extra in ([], [setting]):
        out = run_cli("evaluate.py", *common, *extra, f"hydra.run.dir={runs}/${{run_name}}")
        assert out.returncode == 0, out.stderr[-3000:]
    plain, enhanced = sorted(runs.iterdir(), key=lambda p: "enhanced" in p.name)
    assert plain.name.startswith("none-tiny-sake_mini-") and "enhanced" not in plain.name
    assert enhanced.name.startswith("none-tiny-sake_mini-enhanced-")
    ids = [json.loads((d / "run.json").read_text())["identity"]["model"] for d in (plain, enhanced)]
    assert "enhancement" not in ids[0]
    assert ids[1]["enhancement"] == {**GOOD, "source_layer": 0, "coefficient": 2.0, "position": -1}
    assert ids[0]["fingerprint"] != ids[1]["fingerprint"] and ids[0]["answers"] != ids[1]["answers"]
    with sqlite3.connect(cache) as db:  # every answer generated again, none taken from the plain run's
        counts = dict(db.execute("SELECT model, COUNT(*) FROM responses GROUP BY model").fetchall())
    assert counts.keys() == {ids[0]["answers"], ids[1]["answers"]}
    assert counts[ids[0]["answers"]] == counts[ids[1]["answers"]] > 0
    into_plain = run_cli("evaluate.py", *common, setting, f"hydra.run.dir={plain}")
    assert into_plain.returncode != 0
    assert "model.enhancement.coefficient: null there, 2.0 now" in into_plain.stderr

"""Causal tracing on the shipped tiny LALM (analysis/, analyze.py, trace.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.tracing import CausalTracer, bins, group_order, summarise, windows

ROOT = Path(__file__).resolve().parents[1]


def tracer_settings(**changes):
    """CausalTracer's settings as `analyze.py trace model=tiny` composes them (configs/analysis/
    trace.yaml with configs/tuning/_profiles/tiny/trace.yaml), `changes` written over them."""
    from omegaconf import OmegaConf

    from tests.helpers import composed

    run = OmegaConf.to_container(
        composed("analyze", "analysis=trace", "model=tiny").analysis.run, resolve=True
    )
    return {**{k: v for k, v in run.items() if not k.startswith("_") and k != "samples"}, **changes}


def test_layer_windows_and_position_groups():
    assert [list(w) for w in windows(4, 1)] == [[0], [1], [2], [3]]
    assert [list(w) for w in windows(5, 3)] == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    assert [list(w) for w in windows(2, 10)] == [[0, 1], [0, 1]]
    assert bins(6, 3, "audio") == ["audio1", "audio1", "audio2", "audio2", "audio3", "audio3"]
    assert group_order(["last", "audio10", "question", "audio2", "prefix", "frames1"]) == [
        "prefix", "audio2", "audio10", "frames1", "question", "last"
    ]  # fmt: skip


def traced(tracer, samples):
    for s in samples:
        t = tracer.trace(s.prompt, s.truth)
        if t is not None and t.effects:
            return t
    pytest.skip("the noise moved none of the samples")


@pytest.mark.parametrize("corrupt_at", ["audio_input", "connector"])
def test_restoring_the_last_layer_at_the_last_token_undoes_the_corruption(shipped_lalm, samples, corrupt_at):
    """The last block's output at the last position is all the answer depends on: restoring it
    must recover the clean probability exactly, and restoring nothing changes nothing."""
    tracer = CausalTracer(
        shipped_lalm,
        **tracer_settings(corrupt_at=corrupt_at, noise=10.0, position_stride=1000, min_drop=0.05),
    )
    t = traced(tracer, samples)
    last = shipped_lalm.edit_sites.num_llm_layers - 1
    assert t.p_clean - t.p_corrupted >= 0.05
    (ie,) = t.effects[("llm", "residual", last, "last")]
    assert ie == pytest.approx(t.p_clean - t.p_corrupted, abs=1e-4)
    # the prefix tokens come before the audio: restoring them cannot carry the audio back
    assert all(abs(e) < 1e-4 for k, v in t.effects.items() if k[3] == "prefix" for e in v)
    audio_groups = {k[3] for k in t.effects if k[0] == "audio"}
    assert (corrupt_at == "audio_input") == bool(audio_groups)


def test_batched_restorations_equal_one_at_a_time(shipped_lalm, samples):
    common = dict(noise=10.0, position_stride=1000, min_drop=0.05)
    batched = traced(CausalTracer(shipped_lalm, **tracer_settings(batch_size=64, **common)), samples)
    single = traced(CausalTracer(shipped_lalm, **tracer_settings(batch_size=1, **common)), samples)
    assert batched.effects.keys() == single.effects.keys()
    for k, v in batched.effects.items():
        assert v == pytest.approx(single.effects[k], abs=1e-5), k
    summary = summarise([batched, None])
    assert summary.samples == 1 and summary.skipped == 1
    assert {r["tower"] for r in summary.per_layer()} == {"audio", "llm"}


def run_cli(script, *args):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def test_trace_writes_its_tables_and_plots(mini_dir, tmp_path):
    data = [f"data.root={mini_dir}", "data.build_mini=false"]
    run_cli("trace.py", *data, "analysis.run.samples=1", "analysis.run.position_stride=1000",
            "analysis.run.noise=10", "analysis.run.min_drop=0.0",
            f"hydra.run.dir={tmp_path / 'trace'}")  # fmt: skip
    info = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert info["samples"] + info["skipped_wrong"] + info["skipped_robust"] == 4
    assert all(
        (tmp_path / "trace" / f).is_file() for f in ("trace.csv", "trace_per_layer.csv", "trace_llm.png")
    )


def test_a_subject_span_corruption_touches_exactly_the_spans_frames(lalm):
    """audio_conv noise lands on the encoder stem's output frames that overlap the span, nowhere
    else, scaled by the clean span's spread; in every family's tiny model."""
    import numpy as np
    import torch

    from common.prompt import Prompt
    from lalms.hooks import Hook, hooked_all

    tracer = CausalTracer(lalm, **tracer_settings(corrupt_at="audio_conv", noise=3.0))
    assert tracer.frame_seconds == pytest.approx(0.02)  # Whisper: 10 ms hop, conv2 stride 2
    rng = np.random.default_rng(0)
    prompt = Prompt("Complete the sentence.", (0.1 * rng.standard_normal(24000)).astype(np.float32),
                    sampling_rate=16000)  # fmt: skip
    batch = lalm.to_device(lalm.encode([prompt]))
    outs = []
    stem = lalm.model.get_submodule(tracer.stem)
    with hooked_all([Hook(stem, lambda m, a, out: outs.append(out.detach()))]), torch.no_grad():
        lalm.logits(batch)
    (clean,) = outs
    span = (0.31, 0.58)  # frames 15 .. 28 of 20 ms
    assert list(tracer.span_frames(span, clean.shape[-1])) == list(range(15, 29))
    noise = tracer.noise_for(clean, span)
    touched = (noise != 0).any(dim=1)[0].nonzero().flatten().tolist()
    assert touched == list(range(15, 29))
    spread = noise[..., 15:29].std() / clean[..., 15:29].float().std()
    assert spread == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="needs encoder frames"):
        CausalTracer(lalm, **tracer_settings(corrupt_at="connector")).noise_for(clean, span)


def test_tracing_by_word_restores_each_words_positions_together(shipped_lalm, samples):
    """With words, the LLM's audio rows and the encoder frames of each word are one group; the
    last token's restoration at the last layer undoes any corruption, as without words."""
    import torch

    tracer = CausalTracer(shipped_lalm, **tracer_settings(corrupt_at="audio_conv", noise=10.0, min_drop=0.05))
    for s in samples:
        seconds = len(s.prompt.audio) / (s.prompt.sampling_rate or shipped_lalm.sampling_rate)
        words = {"first_subject": (0.0, 0.4 * seconds), "last_word": (0.8 * seconds, seconds)}
        t = tracer.trace(s.prompt, s.truth, span=(0.0, 0.4 * seconds), words=words)
        if t is not None and t.effects:
            break
    else:
        pytest.skip("the noise moved none of the samples")
    groups = {(k[0], k[3]) for k in t.effects}
    assert groups == {(tw, g) for tw in ("audio", "llm") for g in words} | {("llm", "last")}
    last = shipped_lalm.edit_sites.num_llm_layers - 1
    assert len(t.effects[("llm", "residual", last, "last")]) == 1  # one run per (window, group)
    (ie,) = t.effects[("llm", "residual", last, "last")]
    assert ie == pytest.approx(t.p_clean - t.p_corrupted, abs=1e-4)
    batch = shipped_lalm.encode([s.prompt])
    rows = (batch["input_ids"][0] == shipped_lalm.audio_token_id).nonzero().flatten().tolist()
    frames = {site.path: torch.zeros(1, 200, 1) for site in tracer.sites if site.tower == "audio"}
    placed = tracer.word_positions(batch, frames, words, seconds)
    assert placed["audio"][0] == (list(range(math.ceil(0.4 * seconds / 0.02))), "first_subject")
    placed = placed["llm"]
    assert placed[0] == (rows[: math.ceil(0.4 * len(rows))], "first_subject")
    assert placed[1][0][-1] == rows[-1] and placed[-1] == ([len(batch["input_ids"][0]) - 1], "last")

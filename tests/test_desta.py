"""DeSTA2.5-Audio without the `desta` package: the release layout loads by its published names, the
model computes what upstream's does (prompt layout, Q-Former, tapped encoder layers, transcripts),
the full architecture builds, and every editor runs on a tiny DeSTA (MEND and KE trained for a few
steps through train.py, then scored by evaluate.py)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from editors import WeightSnapshot
from editors.base import ContextHandle, in_context
from editors.hypernet import HypernetEditor
from evaluation.sweep import request
from lalms import DeSTA25, ModelNotAvailableError, Prompt
from lalms.desta import tapped_layers
from tests.helpers import configured

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EDITORS = sorted(p.stem for p in (CONFIGS / "editor").glob("[!_]*.yaml") if p.stem != "none")


@pytest.fixture(scope="module")
def desta_dir(tiny_dirs):
    return tiny_dirs["desta"]


@pytest.fixture(scope="module")
def desta(desta_dir):
    return DeSTA25.load(str(desta_dir), dtype="float32", device="cpu")


def speech_and_sound(mini_dir):
    audio = Path(mini_dir) / "audio"
    read = [
        sf.read(sorted((audio / track).iterdir())[0], dtype="float32")[0] for track in ("Gender", "Animal")
    ]
    return read[0], read[1]


def test_the_tapped_layers_follow_upstreams_table():
    assert tapped_layers(32) == (7, 15, 23, 31)  # whisper-large-v3
    assert tapped_layers(24) == (5, 11, 17, 23)  # medium
    assert tapped_layers(12) == (2, 5, 8, 11)  # small
    assert tapped_layers(4) == (0, 1, 2, 3)  # tiny
    assert tapped_layers(2) == (0, 1)


# ------------------------------------------------------------------ the release layout
def release(tmp_path, desta_dir, **config):
    """A release folder as published: config.json with upstream's fields (and the nested configs
    upstream's save_pretrained writes) and the connector's model.safetensors."""
    out = tmp_path / "release"
    out.mkdir(parents=True)
    ours = json.loads((desta_dir / "config.json").read_text())
    published = {
        "architectures": ["DeSTA25AudioModel"],
        "model_type": "desta25",
        "llm_model_id": str(desta_dir / "llm"),
        "encoder_model_id": str(desta_dir / "whisper"),
        "connector_mode": "qformer_1",
        "qformer_num_hidden_layers": 2,
        "prompt_size": ours["prompt_size"],
        "use_lora": False,
        "audio_locator": "<|AUDIO|>",
        "placeholder_token": "<|reserved_special_token_87|>",
        "llm_config": {"model_type": "llama"},
        "encoder_config": {"model_type": "whisper"},
        "info": "DeSTA2.5 Audio",
        "transformers_version": "4.51.3",
        "qformer_intermediate_size": ours["qformer_intermediate_size"],  # the tiny one's BERT width
        **config,
    }
    (out / "config.json").write_text(json.dumps(published))
    shutil.copy(desta_dir / "model.safetensors", out / "model.safetensors")
    return out


def test_the_connector_weights_carry_the_published_names(desta_dir):
    names = set(load_file(str(desta_dir / "model.safetensors")))
    assert all(n.startswith("perception.connector.") for n in names)
    for name in (
        "layer_prompts.0",
        "layer_weights",
        "qformer.layer.0.attention.self.query.weight",
        "qformer.layer.1.crossattention.self.key.weight",
        "qformer.layer.0.intermediate.dense.weight",
        "qformer.layer.0.output.LayerNorm.weight",
        "proj.0.weight",  # LayerNorm
        "proj.1.weight",  # Linear into the LLM
    ):
        assert f"perception.connector.{name}" in names, name


def test_a_release_folder_loads_on_the_checkpoints_its_config_names(tmp_path, desta_dir, desta, clips):
    folder = release(tmp_path, desta_dir)
    loaded = DeSTA25.load(str(folder), dtype="float32", device="cpu")
    prompts, answers = (
        [Prompt("Which animal?", audio=clips[0]), Prompt("Capital of France?")],
        ["dog", "Paris"],
    )
    torch.testing.assert_close(loaded.loss(prompts, answers), desta.loss(prompts, answers), atol=0, rtol=0)
    assert loaded.source == str(folder)

    # A config naming Hub checkpoints that are not here: the overrides point at local folders.
    hub = release(tmp_path / "hub", desta_dir, llm_model_id="DeSTA-ntu/Llama-3.1-8B-Instruct")
    with pytest.raises(ModelNotAvailableError, match=r"model\.llm_path='DeSTA-ntu/Llama-3.1-8B-Instruct'"):
        DeSTA25.load(str(hub), dtype="float32", device="cpu")
    via = DeSTA25.load(str(hub), llm_path=str(desta_dir / "llm"), dtype="float32", device="cpu")
    torch.testing.assert_close(via.loss(prompts, answers), desta.loss(prompts, answers), atol=0, rtol=0)


def test_a_release_that_is_absent_offline_names_the_setting():
    with pytest.raises(ModelNotAvailableError, match=r"model\.path=.*hf download"):
        DeSTA25.load("DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("drop", "connector weights missing.*layer_weights"),
        ("unknown", "does not have.*perception.connector.extra"),
        ("shape", "layer_weights.*shape"),
    ],
)
def test_bad_connector_weights_are_refused_naming_the_file_and_weight(tmp_path, desta_dir, change, match):
    folder = release(tmp_path, desta_dir)
    weights = load_file(str(folder / "model.safetensors"))
    if change == "drop":
        del weights["perception.connector.layer_weights"]
    elif change == "unknown":
        weights["perception.connector.extra"] = torch.zeros(1)
    else:
        weights["perception.connector.layer_weights"] = torch.zeros(3, 3)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=match) as err:
        DeSTA25.load(str(folder), dtype="float32", device="cpu")
    assert str(folder / "model.safetensors") in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("use_lora", True, "'use_lora'"),
        ("connector_mode", "qformer_2", "'connector_mode'.*qformer_1"),
        ("prompt_size", "64", "'prompt_size' must be a int"),
        ("placeholder_token", "not one token", "'placeholder_token'"),
    ],
)
def test_bad_release_configs_are_refused_naming_the_field(tmp_path, desta_dir, field, value, match):
    folder = release(tmp_path, desta_dir, **{field: value})
    with pytest.raises(ValueError, match=match):
        DeSTA25.load(str(folder), dtype="float32", device="cpu")


# ------------------------------------------------------------------ what the model computes
def test_the_prompt_is_upstreams_layout(desta, mini_dir):
    speech, _ = speech_and_sound(mini_dir)
    prompt = Prompt("Is the speaker male or female?", audio=speech)
    text = desta.render(prompt)
    assert "<|start_header_id|>user<|end_header_id|>\n\n<|AUDIO|>\nIs the speaker" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = desta.encode([prompt])["input_ids"][0].tolist()
    run = [i for i, t in enumerate(ids) if t == desta.audio_token_id]
    size = desta.config.prompt_size
    assert len(run) == size and run == list(range(run[0], run[0] + size))  # one run per clip
    transcript = desta.tokenizer(desta.transcripts([speech])[0], add_special_tokens=False).input_ids
    after = ids[run[-1] + 1 :]
    assert after[: len(transcript)] == transcript  # the transcript follows the connector's vectors
    tok = desta.tokenizer
    assert tok.decode(ids[: run[0]]).endswith("<start_audio>")
    assert tok.decode(after[len(transcript) :]).startswith("<end_audio>\nIs the speaker")


def test_the_audio_positions_take_the_connectors_vectors(desta, clips):
    batch = desta.encode(
        [Prompt("Which animal?", audio=clips[0]), Prompt("Hi?"), Prompt("And?", audio=clips[1])]
    )
    model = desta.model
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["input_features"])
        audio = model.perception(batch["input_features"])
        plain = model.get_input_embeddings()(batch["input_ids"])
    where = batch["input_ids"] == desta.audio_token_id
    torch.testing.assert_close(embeds[where], audio.reshape(-1, audio.shape[-1]))  # clips in order
    torch.testing.assert_close(embeds[~where], plain[~where])  # text and transcripts: their embeddings


def test_the_qformer_prompts_attend_to_each_other_both_ways(desta, clips):
    features = desta.encode([Prompt("x", audio=clips[0])])["input_features"]
    connector = desta.model.perception.connector
    with torch.no_grad():
        before = desta.model.perception(features)
        prompt = connector.layer_prompts[0]
        saved = prompt.detach().clone()
        prompt[:, -1] += 1.0  # the last prompt vector of the first tapped layer
        after = desta.model.perception(features)
        prompt.copy_(saved)
    assert not torch.allclose(before[:, 0], after[:, 0])  # the first vector sees the last


def test_the_encoders_final_layer_norm_is_not_used(desta, clips):
    features = desta.encode([Prompt("x", audio=clips[0])])["input_features"]
    encoder = desta.model.perception.whisper.get_encoder()
    with torch.no_grad():
        before = desta.model.perception(features)
        snap = WeightSnapshot(desta.model, ["perception.whisper.model.encoder.layer_norm.weight"])
        encoder.layer_norm.weight.mul_(3.0)
        unchanged = desta.model.perception(features)
        snap.undo()
        snap = WeightSnapshot(desta.model, ["perception.whisper.model.encoder.layers.1.fc2.weight"])
        encoder.layers[1].fc2.weight.mul_(3.0)
        changed = desta.model.perception(features)
        snap.undo()
    torch.testing.assert_close(unchanged, before, atol=0, rtol=0)
    assert not torch.allclose(changed, before)


def test_transcripts_are_cached_per_clip_and_redone_after_the_encoder_changes(desta, mini_dir, monkeypatch):
    speech, sound = speech_and_sound(mini_dir)
    whisper = desta.model.perception.whisper
    calls = []
    generate = whisper.generate
    monkeypatch.setattr(
        whisper, "generate", lambda **kw: calls.append(len(kw["input_features"])) or generate(**kw)
    )
    desta.transcriber._cache.clear()
    first = desta.transcripts([speech, sound, speech])
    assert calls == [1]  # one batch, the speech clip once: the animal sound has no speech (VAD)
    assert first[1] == " " and first[0] == first[2] and first[0].strip()
    assert desta.transcripts([sound, speech]) == first[1:] and calls == [1]  # cached
    snap = WeightSnapshot(desta.model, ["perception.whisper.model.encoder.layers.0.fc1.weight"])
    with torch.no_grad():
        whisper.get_encoder().layers[0].fc1.weight.add_(0.5)
    desta.transcripts([speech])
    assert calls == [1, 1]  # an edit of Whisper's weights: transcribed again
    snap.undo()


@pytest.mark.parametrize("site", ["encoder", "decoder"])
def test_a_hook_that_changes_whisper_gets_a_fresh_transcript(desta, mini_dir, monkeypatch, site):
    """The cache follows what Whisper computes: a plain forward hook on one of its modules (a layer
    of the encoder, the decoder's output head) is transcribed again once it changes the module's
    output, also while it stays registered; it is not while it changes nothing."""
    speech, _ = speech_and_sound(mini_dir)
    whisper = desta.model.perception.whisper
    calls = []
    generate = whisper.generate
    monkeypatch.setattr(
        whisper, "generate", lambda **kw: calls.append(len(kw["input_features"])) or generate(**kw)
    )
    desta.transcriber._cache.clear()
    first = desta.transcripts([speech])
    token = desta.asr_tokenizer("dog", add_special_tokens=False).input_ids[0]
    active = [False]
    if site == "encoder":
        module = whisper.get_encoder().layers[-1].fc2

        def hook(_module, _args, out):
            return out * 0.5 if active[0] else None
    else:
        module = whisper.proj_out

        def hook(_module, _args, out):
            if not active[0]:
                return None
            out = out.clone()
            out[..., token] += 1e4  # every step picks the token: another transcript
            return out

    handle = module.register_forward_hook(hook)
    try:
        assert desta.transcripts([speech]) == first and calls == [1]  # it changes nothing: cached
        active[0] = True
        hooked = desta.transcripts([speech])
        assert calls == [1, 1]  # its output changed: transcribed again
        if site == "decoder":
            assert hooked != first and hooked[0].startswith(desta.asr_tokenizer.decode([token]).strip())
        assert desta.transcripts([speech]) == hooked and calls == [1, 1]  # cached as hooked
        desta.transcriber._cache.clear()
        assert desta.transcripts([speech]) == hooked  # what an uncached transcription gives
    finally:
        handle.remove()
    assert desta.transcripts([speech]) == first and calls == [1, 1, 1, 1]  # unhooked: transcribed again


def test_random_init_builds_the_published_architecture():
    cfg = OmegaConf.load(CONFIGS / "model" / "desta.yaml")
    lalm = DeSTA25.load(cfg.path, random_init=True, arch=cfg.arch, device="meta", dtype="bfloat16")
    n = sum(p.numel() for p in lalm.model.parameters())
    llm = sum(p.numel() for p in lalm.model.llm_model.parameters())
    whisper = sum(p.numel() for p in lalm.model.perception.whisper.parameters())
    assert llm / 1e9 == pytest.approx(8.03, abs=0.01)  # Llama-3.1-8B
    assert whisper / 1e9 == pytest.approx(1.54, abs=0.01)  # Whisper-large-v3
    assert n / 1e9 == pytest.approx(9.71, abs=0.01)  # with the release recipe's 6-layer Q-Former
    assert lalm.edit_sites.num_llm_layers == 32 and lalm.edit_sites.num_audio_layers == 32
    assert lalm.model.perception.connector.target_layer_ids == (7, 15, 23, 31)
    assert lalm.feature_extractor.feature_size == 128 and lalm.feature_extractor.chunk_length == 30
    # as upstream: the LLM in the chosen dtype, Whisper and the connector in float32
    assert lalm.model.llm_model.dtype == torch.bfloat16 and lalm.model.perception_dtype == torch.float32


def test_text_only_prompts_start_with_two_bos_as_upstream_tokenises_them(desta, clips):
    bos = desta.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    text = desta.encode([Prompt("Capital of France?")])["input_ids"][0].tolist()
    audio = desta.encode([Prompt("Which animal?", audio=clips[0])])["input_ids"][0].tolist()
    assert text[:2] == [bos, bos] and audio[0] == bos and audio[1] != bos


# ------------------------------------------------------------------ every editor
def build_editor(name, desta, pool):
    """Editor `name` as evaluate.py builds it for model=tiny_desta (a smaller key corpus)."""
    corpus = (
        "editor.hparams.corpus.text=10",
        "editor.hparams.corpus.audio=5",
        "editor.hparams.corpus.cache_dir=null",
    )
    editor = configured(
        name, desta, pool, *(corpus if "rome" in name or "alphaedit" in name else ()), model="tiny_desta"
    )
    return HypernetEditor(editor) if name in ("mend", "ke") else editor


@pytest.mark.parametrize("name", EDITORS)
def test_every_editor_edits_the_tiny_desta_and_undoes_exactly(name, desta, pool, mini, mini_dir):
    state = {k: v.detach().clone() for k, v in desta.model.state_dict().items()}
    editor = build_editor(name, desta, pool)
    prompt = PromptMaker(AudioResolver(Path(mini_dir) / "audio"), desta.sampling_rate)
    inst = mini.test[0]
    edit = request(inst, prompt(inst.reliability))
    if name.startswith("facts_"):  # the spoken-facts strategies read their keys over a word's span
        edit = dataclasses.replace(edit, span=(0.1, 0.4))
    before = desta.generate([edit.prompt], max_new_tokens=4)
    handle = editor.apply(edit)
    asked = in_context([handle], edit.prompt)
    after = desta.generate([asked], max_new_tokens=4)
    changed = [k for k, v in desta.model.state_dict().items() if not torch.equal(v, state[k])]
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in desta.model.modules())
    assert changed or hooked or isinstance(handle, ContextHandle), "the edit changed nothing"
    assert isinstance(after[0], str)
    handle.undo()
    assert [k for k, v in desta.model.state_dict().items() if not torch.equal(v, state[k])] == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in desta.model.modules())
    assert desta.generate([edit.prompt], max_new_tokens=4) == before


# ------------------------------------------------------------------ through the entry points
def run(script, *args):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("editor", ["mend", "ke"])
def test_hypernetworks_train_on_a_tiny_desta_and_are_scored(editor, mini_dir, tmp_path):
    folder = tmp_path / "tiny-desta"
    run("-m", "lalms.tiny", "--family", "desta", "--out", str(folder))
    export = tmp_path / "export"
    data = [f"data.root={mini_dir}", "data.build_mini=false"]
    model = ["model=desta", f"model.path={folder}", "model.asr_max_new_tokens=8"]
    run(
        "train.py", f"editor={editor}", *model, *data, "+trainer.max_steps=3", "data.batch_size=2",
        f"editor.callbacks.export.out_dir={export}", f"hydra.run.dir={tmp_path / 'train'}",
    )  # fmt: skip
    info = OmegaConf.to_container(OmegaConf.load(export / "editor.yaml"))
    assert info["model"]["family"] == "DeSTA25" and info["model"]["path"] == str(folder)
    assert all(p.startswith("llm_model.model.layers.") for p in info["model"]["edited_parameters"])
    out = run(
        "evaluate.py", f"ckpt={export}", *model, *data, "data.max_instances=2", "sweeps=[single]",
        f"hydra.run.dir={tmp_path / 'eval'}", f"response_cache={tmp_path / 'cache.sqlite'}",
    )  # fmt: skip
    assert f"| {editor} (export" in out.stdout + out.stderr  # the table row of this export
    assert "[transformers]" not in out.stdout + out.stderr  # Whisper's generate notices (cli/config.py)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["counts"]["instances"]["single"] == 2
    assert metrics["run"]["model"].startswith("desta (")


@pytest.mark.slow
def test_random_init_runs_at_reduced_depth_on_cpu():
    arch = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "desta.yaml").arch)
    arch["llm"]["num_hidden_layers"] = 1
    arch["encoder"].update(encoder_layers=4, decoder_layers=1)
    lalm = DeSTA25.load("DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B", random_init=True, arch=arch,
                        dtype="bfloat16", device="cpu", asr_max_new_tokens=2, vad="none")  # fmt: skip
    prompt = [Prompt("Which animal?", audio=np.full(16000, 0.01, np.float32))]
    assert np.isfinite(lalm.loss(prompt, ["dog"]).item())
    assert len(lalm.generate(prompt, max_new_tokens=2)) == 1

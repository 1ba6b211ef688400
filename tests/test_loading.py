"""Loading: clear errors when weights are absent offline; random-init of the published configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lalms import AudioFlamingo3, ModelNotAvailableError, Prompt, Qwen2Audio
from lalms.tiny import build_tiny
from lalms.tiny import main as tiny_main
from tests.helpers import load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def test_absent_weights_offline_give_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"model\.path=.*hf download.*set model\.path=DIR"):
        load_model(Qwen2Audio, "Qwen/Qwen2-Audio-7B-Instruct")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotAvailableError, match="holds no usable weights"):
        load_model(Qwen2Audio, empty)


def test_random_init_without_arch_and_without_hub_is_an_error():
    with pytest.raises(ModelNotAvailableError, match="config"):
        load_model(Qwen2Audio, "Qwen/Qwen2-Audio-7B-Instruct", random_init=True)


@pytest.mark.parametrize(
    ("cls", "config", "billions", "llm_layers"),
    [(Qwen2Audio, "qwen.yaml", 8.40, 32), (AudioFlamingo3, "af3.yaml", 8.27, 28)],
)
def test_random_init_builds_the_published_architecture(cls, config, billions, llm_layers):
    cfg = OmegaConf.load(CONFIGS / config)
    lalm = load_model(cls, cfg.path, random_init=True, arch=cfg.arch, device="meta")  # shapes only, no memory
    n = sum(p.numel() for p in lalm.model.parameters())
    assert n / 1e9 == pytest.approx(billions, abs=0.01)
    assert lalm.edit_sites.num_llm_layers == llm_layers and lalm.edit_sites.num_audio_layers == 32
    assert lalm.processor.feature_extractor.feature_size == 128  # sized from the encoder config
    assert lalm.processor.feature_extractor.chunk_length == 30


@pytest.mark.slow
def test_random_init_runs_at_reduced_depth_on_cpu():
    arch = OmegaConf.to_container(OmegaConf.load(CONFIGS / "qwen.yaml").arch)
    arch["text_config"]["num_hidden_layers"] = 1
    arch["audio_config"]["encoder_layers"] = 1
    lalm = load_model(
        Qwen2Audio, "Qwen/Qwen2-Audio-7B-Instruct", random_init=True, arch=arch, dtype="bfloat16"
    )
    prompt = [Prompt("Which animal?", audio=np.full(16000, 0.01, np.float32))]
    assert np.isfinite(lalm.loss(prompt, ["dog"]).item())
    assert len(lalm.generate(prompt, max_new_tokens=2)) == 1


def test_tiny_cli_writes_a_loadable_model_dir(tmp_path):
    tiny_main(["--family", "audio_flamingo3", "--out", str(tmp_path / "af3"), "--seed", "1"])
    lalm = load_model(AudioFlamingo3, tmp_path / "af3")
    built = build_tiny(AudioFlamingo3, seed=1)  # the same model, never saved
    saved = lalm.model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in built.model.state_dict().items())
    prompt = [Prompt("Hello?")]
    answer = lalm.generate(prompt, max_new_tokens=3)
    assert isinstance(answer[0], str) and answer == built.generate(prompt, max_new_tokens=3)

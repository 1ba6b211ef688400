"""The embedded default: checkpoints/tiny-lalm loads offline and really hears the attributes."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from datamodules import AudioResolver, SakeData
from datamodules.builder import load_world
from evaluation.unedited import base_accuracy
from tests.helpers import load_model

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "tiny-lalm"


@pytest.fixture(scope="module")
def shipped():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"model.path={CHECKPOINT}"])
    return instantiate(cfg.model)


def test_the_default_model_config_loads_the_shipped_checkpoint(shipped):
    assert sum(p.numel() for p in shipped.model.parameters()) < 2e6
    assert shipped.edit_sites.num_llm_layers == 4
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) < 20 * 2**20
    assert (CHECKPOINT / "README.md").read_text().count("|") > 10  # the model card's accuracy table


def test_the_shipped_model_answers_sake_mini_queries(shipped, mini_dir):
    """A fresh small SAKE-mini build (48 instances) as an independent check that the checkpoint
    is the trained one (an untrained model scores ~0); the full bars are the slow test below."""
    data = SakeData.load(mini_dir)
    metrics = base_accuracy(
        shipped, data.test, AudioResolver(mini_dir / "audio"), load_world(mini_dir / "world.yaml")
    )
    assert metrics["attribute/gender"]["accuracy"] >= 0.75
    assert metrics["attribute/average"]["accuracy"] >= 0.6
    assert metrics["text_qa"]["accuracy"] >= 0.8
    assert metrics["general_audio"]["accuracy"] >= 0.6


@pytest.mark.slow
def test_the_shipped_model_meets_its_model_card_bars():
    """The full SAKE-mini test split (builds data/sake_mini if needed; several minutes)."""
    from datamodules.mini.build import ensure_mini

    root = ensure_mini(ROOT / "data" / "sake_mini")
    from lalms import Qwen2Audio

    lalm = load_model(Qwen2Audio, CHECKPOINT)
    data = SakeData.load(root)
    m = base_accuracy(lalm, data.test, AudioResolver(root / "audio"), load_world(root / "world.yaml"))
    attrs = [m[f"attribute/{a}"]["accuracy"] for a in ("gender", "emotion", "language", "animal")]
    assert sum(attrs) / 4 >= 0.85 and min(attrs) >= 0.75
    assert m["portability"]["accuracy"] >= 0.8
    assert m["general_audio"]["accuracy"] >= 0.8
    assert m["text_qa"]["accuracy"] >= 0.9

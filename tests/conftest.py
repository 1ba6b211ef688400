import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each, here and in the entry points it starts

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lalms import FAMILIES, Qwen2Audio  # noqa: E402
from lalms.tiny import build_tiny  # noqa: E402
from tests.helpers import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A saved tiny model directory per family (random weights, fixed seed)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(cls, root / name, seed=0) and root / name for name, cls in FAMILIES.items()}


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def lalm(request, tiny_dirs):
    """A tiny LALM of each family, loaded from disk like any model directory."""
    return load_model(FAMILIES[request.param], tiny_dirs[request.param])


@pytest.fixture
def clips():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noise = (0.1 * rng.standard_normal(24000)).astype(np.float32)
    return tone, noise


SMALL_MINI = dict(
    clips_per_label=10,
    general_per_label=6,
    train_per_attribute=24,
    val_per_attribute=4,
    test_per_attribute=12,
    sequences=3,
    sequence_length=10,
)


@pytest.fixture(scope="session")
def mini_dir(tmp_path_factory):
    """A small SAKE-mini build (same code as the default, smaller pools and splits)."""
    from datamodules.mini.build import MiniSizes, build_mini

    return build_mini(
        tmp_path_factory.mktemp("mini") / "sake_mini", seed=0, sizes=MiniSizes(**SMALL_MINI), workers=2
    )


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Two builds of a small spoken-facts world (6 facts a relation, one neighbour, one training
    rendition a prompt), each in a process of its own with another string-hashing seed."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("facts")
    code = (
        "import sys; from datamodules.mini.facts import FactSizes, build_facts; "
        "build_facts(sys.argv[1], seed=3, sizes=FactSizes(facts_per_relation=6, neighbours=1, renditions=1), "
        "workers=1)"
    )
    for name, hash_seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cwd = Path(__file__).resolve().parents[1]
        subprocess.run([sys.executable, "-c", code, str(root / name)], cwd=cwd, env=env, check=True)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def shipped_lalm():
    """The shipped tiny LALM (checkpoints/tiny-lalm), loaded once per test module."""
    from pathlib import Path

    return load_model(Qwen2Audio, Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-lalm")


@pytest.fixture(scope="session")
def pool(mini_dir):
    """The small SAKE-mini build's train split, as editors draw on it (at 16 kHz)."""
    from datamodules.pool import SakeTrainPool

    return SakeTrainPool(mini_dir, None, 16000)


@pytest.fixture(scope="module")
def mini(mini_dir):
    """The small SAKE-mini build, loaded."""
    from datamodules import SakeData

    return SakeData.load(mini_dir)


@pytest.fixture(scope="module")
def samples(shipped_lalm, mini_dir):
    """The first 3 test instances of each attribute as probing samples (reliability question + clip)."""
    from analysis.samples import reliability_samples
    from datamodules import SakeDataModule

    data = SakeDataModule(str(mini_dir), name="sake_mini")
    return reliability_samples(data.eval_instances(), data.audio_root, shipped_lalm.sampling_rate, 3)

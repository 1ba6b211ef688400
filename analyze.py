"""Interpretability analyses of an LALM on SAKE-format data.

python analyze.py lens                                      # AudioLens's logit lens per attribute
python analyze.py lens ckpt=checkpoints/mend-tiny-sake_mini # ... and before/after an editor's edits
python analyze.py knockout                                  # attention knockout over layer windows
python analyze.py enhance                                   # the AudioLens enhancement, tuned on val
python analyze.py trace model=qwen                          # speech-aware causal tracing
python analyze.py lens enhancement=outputs/analyze/enhance-tiny-sake_mini/enhancement.yaml
                                                            # the lens of the enhanced model
python analyze.py trace --cfg job                           # print the composed config
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from cli.config import (  # noqa: E402
    build_editor,
    enhance,
    log_config,
    model_enhancement,
    quiet_library_notices,
    register_resolvers,
)


def analyze(cfg: DictConfig):
    """Run the chosen analysis (`cfg.analysis.run`) on the model and data of `cfg` (enhanced
    with `enhancement=`, lalms/enhancement.py: a setting of the unedited model)."""
    log_config()
    enhancement = model_enhancement(cfg)  # checked before anything is loaded
    analysis = instantiate(cfg.analysis.run)
    data = instantiate(cfg.data)
    data.prepare_data()  # builds SAKE-mini on first use
    lalm = instantiate(cfg.model)
    enhance(enhancement, lalm)
    kwargs = {}
    if cfg.ckpt or cfg.get("editor"):
        if "editor" not in inspect.signature(analysis.func).parameters:
            raise ValueError(f"analysis={cfg.analysis.name} reads the unedited model; drop ckpt= / editor=")
        kwargs["editor"] = build_editor(cfg, lalm, data.train_pool(lalm.sampling_rate))[0]
    return analysis(lalm=lalm, data=data, out_dir=Path(cfg.paths.output_dir), **kwargs)


@hydra.main(version_base="1.3", config_path="configs", config_name="analyze")
def main(cfg: DictConfig):
    return analyze(cfg)


def as_overrides(argv: list[str]) -> list[str]:
    """`analyze.py lens ...` -> `analyze.py analysis=lens ...` (a bare first word names the analysis)."""
    if len(argv) > 1 and "=" not in argv[1] and not argv[1].startswith("-"):
        return [argv[0], f"analysis={argv[1]}", *argv[2:]]
    return argv


if __name__ == "__main__":
    quiet_library_notices()
    register_resolvers()
    sys.argv = as_overrides(sys.argv)
    main()

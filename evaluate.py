"""Evaluate a knowledge editor on SAKE-format data (reliability, generality, locality, portability).

python evaluate.py ckpt=checkpoints/mend-tiny-sake_mini      # a trained, exported editor
python evaluate.py editor=<name> model=qwen                   # an editor that needs no training
python evaluate.py dry_run=true                               # print the plan and exit
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from editors.checkpoint import load_editor, read_info  # noqa: E402
from evaluation import base  # noqa: E402
from lit_modules.hydra_utils import MissingChoiceError, log_config, require  # noqa: E402

log = logging.getLogger(__name__)


def plan(cfg: DictConfig) -> str:
    def chosen(group: str) -> str:
        node = cfg.get(group)
        return node.get("name", "custom") if node else f"<{group}=...>"

    editor = cfg.ckpt or chosen("editor")
    data, judge = chosen("data"), chosen("judge")
    model = f"{cfg.model._target_.rsplit('.', 2)[-2]} ({cfg.model.get('path', 'new')})"
    return (
        f"evaluate {editor} on {model} over {data}, "
        f"judged by {judge}: single editing (edit, score, restore, next) and sequential editing "
        f"(10 sequences of 10, gaps 0-5); results.jsonl, metrics.json, report.md and plots under "
        f"{cfg.paths.output_dir}"
    )


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    log_config(cfg)
    log.info("plan: %s", plan(cfg))
    if cfg.dry_run:
        return
    editor = cfg.get("editor") or (
        None if cfg.ckpt else require(cfg, "editor", "evaluate.py needs an editor")
    )
    info = read_info(cfg.ckpt) if cfg.ckpt else None  # fails early on a folder that is no export
    data = instantiate(require(cfg, "data", "evaluation needs SAKE-format test data"))
    data.prepare_data()  # builds SAKE-mini on first use
    if editor is not None and editor.get("base_only"):
        base.run(instantiate(cfg.model), data, cfg.paths.output_dir, cfg.limit, cfg.batch_size)
        return
    if info is not None:  # a trained editor: it must have been trained on this model
        lalm = instantiate(cfg.model)
        load_editor(cfg.ckpt, lalm)
        log.info(
            "loaded the %s editor from %s (trained on %s)", info["editor"], cfg.ckpt, info["model"]["name"]
        )
    raise MissingChoiceError("the evaluation sweeps are not part of this build yet; use dry_run=true")


if __name__ == "__main__":
    main()

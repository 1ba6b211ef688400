"""Meta-train a knowledge editor on SAKE-format data.

python train.py editor=mend model=qwen trainer=ddp
python train.py --cfg job editor=mend model=qwen      # print the composed config
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from lit_modules.base import ExportEditor  # noqa: E402
from lit_modules.hydra_utils import instantiate_loggers, log_config, register_resolvers, require  # noqa: E402

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    # The LightningModule and its callbacks: a recipe's own (experiment=pretrain_tiny), or the
    # editor's (editor=...), which add to the global `callbacks`.
    callback_cfgs = dict(cfg.get("callbacks") or {})
    if cfg.get("module"):
        module_cfg = cfg.module
    else:
        editor = require(cfg, "editor", "train.py meta-trains an editor")
        module_cfg = editor.module
        callback_cfgs = {**(editor.get("callbacks") or {}), **callback_cfgs}
    data = require(cfg, "data", "training needs the SAKE train split")
    log_config(cfg)
    callbacks = [instantiate(c) for c in callback_cfgs.values() if c is not None]
    exports = [c for c in callbacks if isinstance(c, ExportEditor)]
    for export in exports:
        export.check()  # an export of another recipe is never replaced: refused now, not at the end
    if cfg.skip_if_exported and exports and all(e.status() == "same" for e in exports):
        log.info("already trained by this recipe: %s", ", ".join(str(e.out_dir) for e in exports))
        return
    L.seed_everything(cfg.seed, workers=True)
    lalm = instantiate(cfg.model)
    module = instantiate(module_cfg, lalm=lalm)
    datamodule = instantiate(data)
    trainer = instantiate(cfg.trainer, logger=instantiate_loggers(cfg.get("logger")), callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)


if __name__ == "__main__":
    register_resolvers()
    main()

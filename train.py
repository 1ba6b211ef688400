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
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from cli.config import (  # noqa: E402
    apply_training_changes,
    instantiate_loggers,
    log_config,
    quiet_library_notices,
    register_resolvers,
    require,
)
from lit_modules.base import ExportEditor, build_module  # noqa: E402

log = logging.getLogger(__name__)


def plan(cfg: DictConfig, editor: DictConfig | None) -> str:
    """One line: what is trained, on what, for how long, and where it goes."""
    if editor is None:
        what = cfg.module._target_.rsplit(".", 1)[-1]
    else:
        what = f"{'meta-train' if editor.get('needs_training') else 'fit'} {editor.name}"
    data, trainer = cfg.data, cfg.trainer
    edits = f"the first {data.max_instances} of " if data.get("max_instances") else ""
    steps = trainer.get("max_steps") or -1
    schedule = f"{steps} steps" if steps > 0 else f"{trainer.max_epochs} epoch(s)"
    model = cfg.model.get("name") or cfg.model._target_.rsplit(".", 1)[-1]  # a new model has no name yet
    where = f" ({cfg.model.path})" if cfg.model.get("path") else ""
    return (
        f"{what} on {model}{where} with {edits}{data.get('name', 'the')} training "
        f"data, batch {data.batch_size}, {schedule} on {trainer.accelerator} x{trainer.devices}; "
        f"logs and checkpoints under {cfg.paths.output_dir}"
    )


def module_source() -> str:
    """The file a recipe's `module` comes from (configs/experiment/<name>.yaml), for errors."""
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    return f"configs/experiment/{experiment}.yaml" if experiment else "configs/train.yaml"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    # The LightningModule and its callbacks: a recipe's own (experiment=pretrain_tiny), or the
    # editor's (editor=...), which add to the global `callbacks`. An editor's `training` adjusts
    # the data and trainer for its training alone (configs/tuning/tiny/unke.yaml).
    callback_cfgs = dict(cfg.get("callbacks") or {})
    editor = None
    if cfg.get("module"):
        module_cfg = cfg.module
    else:
        editor = require(cfg, "editor", "train.py meta-trains an editor")
        module_cfg = editor.module
        callback_cfgs = {**(editor.get("callbacks") or {}), **callback_cfgs}
        apply_training_changes(cfg, HydraConfig.get().overrides.task)
    data = require(cfg, "data", "training needs the SAKE train split")
    log.info("plan: %s", plan(cfg, editor))
    log_config()
    callbacks = [instantiate(c) for c in callback_cfgs.values() if c is not None]
    exports = [c for c in callbacks if isinstance(c, ExportEditor)]
    for export in exports:
        export.check()  # an export of another recipe is never replaced: refused now, not at the end
        log.info("export: %s", export.out_dir)
    if cfg.skip_if_exported and exports and all(e.status() == "same" for e in exports):
        log.info("already trained by this recipe: %s", ", ".join(str(e.out_dir) for e in exports))
        return
    L.seed_everything(cfg.seed, workers=True)
    lalm = instantiate(cfg.model)
    datamodule = instantiate(data)
    datamodule.prepare_data()  # builds SAKE-mini on first use, before an editor draws on it
    # The module's `hp` (objective, schedule) is parsed from its config: a missing, unknown or
    # mistyped key is an HParamsError naming the file and the key.
    if editor is None:
        module = build_module(module_cfg, module_source(), "module", lalm=lalm)
    else:  # an editor's module draws on the train split through the pool
        pool = datamodule.train_pool(lalm.sampling_rate)
        module = build_module(
            module_cfg, f"configs/editor/{editor.name}.yaml", "module", lalm=lalm, pool=pool
        )
    trainer = instantiate(cfg.trainer, logger=instantiate_loggers(cfg.get("logger")), callbacks=callbacks)
    # weights_only: a checkpoint is data (whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)


if __name__ == "__main__":
    quiet_library_notices()
    register_resolvers()
    main()

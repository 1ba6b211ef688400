"""Speech-aware causal tracing: `python trace.py [model=...] [analysis.run.samples=N ...]`, the same
as `python analyze.py trace ...` (analysis/tracing.py, configs/analysis/trace.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from analyze import analyze
from cli.config import quiet_library_notices, register_resolvers


@hydra.main(version_base="1.3", config_path="configs", config_name="analyze")
def main(cfg: DictConfig):
    return analyze(cfg)


if __name__ == "__main__":
    quiet_library_notices()
    register_resolvers()
    sys.argv.insert(1, "analysis=trace")
    main()

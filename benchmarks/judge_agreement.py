"""How close a judge comes to reference figures on saved responses, cell by cell:

    python benchmarks/judge_agreement.py \\
        --results ../shared/data/sake-authors-outputs/MEND-Qwen2-Audio/single \\
        --reference benchmarks/reference/sake_table9_mend_qwen2audio.yaml [--judge rule] [--reasons]

`--results` is a results.jsonl of this project, an EasyEdit output file, or a folder of them
(evaluation/rescore.py reads them); `--reference` a YAML of rows (ALL and per attribute) of
cells (evaluation/agreement.py). Prints each cell's figure beside the reference and the gap,
the largest gaps, and with --reasons how the judge decided each kind of query.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from evaluation.agreement import agreement, judged  # noqa: E402

# The bars a judge is held to: 2 points on the ALL row, 4 per attribute.
WITHIN = {"ALL": 2.0}
WITHIN_ATTRIBUTE = 4.0


def judge(name: str):
    if name == "rule":
        from evaluation.judges.rule import RuleJudge

        return RuleJudge()
    from omegaconf import OmegaConf

    from evaluation.judges.openai_judge import OpenAIJudge

    cfg = OmegaConf.load(ROOT / "configs" / "judge" / "openai.yaml")  # the paper's settings
    return OpenAIJudge(cfg.name, cfg.request, cfg.connection, ROOT / "outputs" / "cache" / "judge.sqlite")


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--judge", choices=("rule", "openai"), default="rule")
    parser.add_argument("--reasons", action="store_true", help="count the judge's reasons per query kind")
    args = parser.parse_args(argv)
    records, metrics = judged(args.results, judge(args.judge))
    cells = agreement(metrics, args.reference)
    print(f"{args.judge} judge on {args.results} ({len(records)} edits) against {args.reference.name}")
    print(f"{'row':<9} {'cell':<22} {'reference':>9} {'judge':>8} {'gap':>7}")
    for c in cells:
        shown = "-" if c.judge is None else f"{c.judge:.2f}"
        gap = "-" if c.gap is None else f"{c.gap:+.2f}"
        print(f"{c.row:<9} {c.cell:<22} {c.reference:>9.2f} {shown:>8} {gap:>7}")
    worst = sorted((c for c in cells if c.gap is not None), key=lambda c: -abs(c.gap))[:5]
    print("largest gaps: " + ", ".join(f"{c.row}/{c.cell} {abs(c.gap):.2f}" for c in worst))
    beyond = [c for c in cells if c.gap is None or abs(c.gap) > WITHIN.get(c.row, WITHIN_ATTRIBUTE)]
    print(f"cells beyond 2 points (ALL) or 4 points (per attribute): {len(beyond)} of {len(cells)}")
    if args.reasons:
        queries = [q for r in records for q in r["queries"]]
        for kind in ("reliability", "generality", "audio_locality", "text_locality", "portability"):
            counts = Counter((q.reason, "yes" if q.verdict else "no") for q in queries if q.kind == kind)
            print(f"{kind}: " + ", ".join(f"{r} {v} {n}" for (r, v), n in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

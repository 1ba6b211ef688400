"""AudioLens's enhancement (arXiv 2506.05140), searched on the validation split and reported on test.

The enhancement (lalms/enhancement.py) adds `coefficient` times an earlier layer's output to
deeper layers' outputs at one position of the prompt, during the prefill. `run` grid-searches its
source layer, target layers, coefficient and position on the VALIDATION split, choosing the
setting of the highest recognition accuracy averaged over the attributes (ties: the smaller
|coefficient|, then the first in grid order); the test split is read only for the chosen setting
and the plain model, never to choose.

Recognition (as the lens's `recognised`, analysis/lens.py): a probe (analysis/probes.py; the
default variant `sake` is SAKE's reliability question, the answer starting the reply) is
recognised when its label's first token leads the attribute's labels (`leads`) in the model's
next-token distribution at the last position; one forward per batch.

Outputs, in the run folder:
- enhance_grid.csv: every grid point with its validation accuracy per attribute and their mean,
  and the gain over the plain model's;
- enhance.json: the grid, the plain model's validation accuracy, the choice, the test split's
  accuracy before and after with the relative gain, and the commands that use the choice;
- enhance.csv: per attribute (and their mean) the test accuracy before and after, the gain and the
  relative gain;
- enhance.png: per attribute before/after bars (test), and the validation accuracy of the grid;
- enhancement.yaml: the chosen setting, to pass back as `enhancement=` to evaluate.py (editor=none)
  and analyze.py.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from analysis.probes import VARIANTS, Prober, leads
from analysis.samples import reliability_samples
from analysis.tables import write_csv
from common.progress import progress_bar
from datamodules.schema import SAKE_LABELS
from lalms.base import LALM, last_position_only
from lalms.enhancement import Enhancement
from lalms.hooks import hooked

log = logging.getLogger(__name__)

MEAN = "mean"  # the row / key of the mean over attributes


@dataclass(frozen=True)
class Batch:
    """Probes encoded once, read under every setting: the encoded batch (on the CPU), and per row
    the attribute, the labels' first tokens and the index of the right one."""

    encoded: dict[str, torch.Tensor]
    attributes: tuple[str, ...]
    label_ids: tuple[tuple[int, ...], ...]
    right: tuple[int, ...]


class Recognition:
    """Recognition accuracy per attribute of a fixed set of probes, under the model as it is."""

    def __init__(self, prober: Prober, samples: Sequence, variant: str, batch_size: int) -> None:
        self.lalm = prober.lalm
        probes = [prober.probe(s, variant) for s in samples]
        if not probes:
            raise ValueError("no samples to read recognition on")
        self.batches = []
        for start in range(0, len(probes), batch_size):
            part = probes[start : start + batch_size]
            self.batches.append(
                Batch(
                    prober.encode(part),
                    tuple(p.attribute for p in part),
                    tuple(tuple(prober.label_ids(p)) for p in part),
                    tuple(prober.right(p) for p in part),
                )
            )
        counts: dict[str, int] = defaultdict(int)
        for p in probes:
            counts[p.attribute] += 1
        self.counts = dict(sorted(counts.items()))

    @torch.no_grad()
    def recognised(self) -> list[tuple[str, bool]]:
        """(attribute, recognised) per probe: one forward per batch, the output projection on the
        last position only."""
        lalm, out = self.lalm, []
        es = lalm.edit_sites
        for batch in self.batches:
            if es.lm_head is not None:
                with hooked(lalm.model.get_submodule(es.lm_head), last_position_only, pre=True):
                    logits = lalm.logits(batch.encoded)
            else:
                logits = lalm.logits(batch.encoded)
            probs = logits[:, -1].float().softmax(-1)
            for row, (attribute, ids, right) in enumerate(
                zip(batch.attributes, batch.label_ids, batch.right, strict=True)
            ):
                out.append((attribute, bool(leads(probs[row, list(ids)], right, ids))))
        return out

    def accuracy(self, enhancement: Enhancement | None = None) -> dict[str, float]:
        """Per attribute the share recognised, and their mean (`MEAN`), under `enhancement` (put on
        the model for this reading only; None: the plain model)."""
        if enhancement is None:
            hits = self.recognised()
        else:
            with enhancement.apply(self.lalm):
                hits = self.recognised()
        by: dict[str, list[bool]] = defaultdict(list)
        for attribute, hit in hits:
            by[attribute].append(hit)
        acc = {a: float(np.mean(v)) for a, v in sorted(by.items())}
        return {**acc, MEAN: float(np.mean(list(acc.values())))}


def grid(
    source_layers: Sequence[int],
    target_layers: Sequence[int | Sequence[int]],
    coefficients: Sequence[float],
    positions: Sequence[int],
    num_layers: int,
) -> list[Enhancement]:
    """Every setting of the grid on a model of `num_layers` LLM layers (layers counted from 0),
    in grid order, without repeats; a source that is not below all of a target set's layers is
    no setting and left out. Each entry of `target_layers` is one layer or the layers enhanced
    together."""
    for key, values in (("source_layers", source_layers), ("target_layers", target_layers),
                        ("coefficients", coefficients), ("positions", positions)):  # fmt: skip
        if not values:
            raise ValueError(f"analysis.run.{key}: empty, the grid has no setting")
    points: list[Enhancement] = []
    for source in source_layers:
        s = _layer(source, "source_layers", num_layers)
        for targets in target_layers:
            together = [targets] if isinstance(targets, int) else list(targets)
            ts = [_layer(t, "target_layers", num_layers) for t in together]
            if not ts or any(s >= t for t in ts):
                continue  # no setting: the source must lie below every target
            for coefficient in coefficients:
                for position in positions:
                    where = f"analysis.run (source {source}, targets {together}, coefficient {coefficient})"
                    raw = {
                        "source_layer": s,
                        "target_layers": ts,
                        "coefficient": coefficient,
                        "position": position,
                    }
                    point = Enhancement.parse(raw, where).resolved(num_layers)
                    if point not in points:
                        points.append(point)
    if not points:
        raise ValueError(f"analysis.run: no grid point has its source layer below all its target "
                         f"layers (source_layers {list(source_layers)}, target_layers "
                         f"{list(target_layers)})")  # fmt: skip
    return points


def _layer(layer, key: str, num_layers: int) -> int:
    """A grid's layer counted from 0 (negative ones from the last), or an error naming `key`."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(f"analysis.run.{key}: {layer!r} is not one of the model's {num_layers} LLM layers")
    return layer % num_layers


def choose(points: Sequence[Enhancement], scores: Sequence[Mapping[str, float]]) -> int:
    """The index of the best point: highest mean accuracy, then smaller |coefficient|, then first."""
    best = 0
    for i in range(1, len(points)):
        key = (scores[i][MEAN], -abs(points[i].coefficient))
        if key > (scores[best][MEAN], -abs(points[best].coefficient)):
            best = i
    return best


def relative_gain(before: float, after: float) -> float | None:
    """(after - before) / before; None where before is 0."""
    return None if before == 0 else (after - before) / before


def comparison(
    before: Mapping[str, float], after: Mapping[str, float], counts: Mapping[str, int]
) -> list[dict]:
    """enhance.csv's rows: per attribute and for the mean, before, after, gain, relative gain."""
    rows = []
    for key in [*counts, MEAN]:
        gain = relative_gain(before[key], after[key])
        rows.append({"attribute": key, "before": round(before[key], 4), "after": round(after[key], 4),
                     "gain": round(after[key] - before[key], 4),
                     "relative_gain": None if gain is None else round(gain, 4),
                     "samples": counts[key] if key in counts else sum(counts.values())})  # fmt: skip
    return rows


def setting_file(path: Path, chosen: Enhancement, note: Sequence[str]) -> None:
    """The chosen setting as YAML (what `enhancement=` reads), `note` as comments above it."""
    head = "".join(f"# {line}\n" for line in note)
    path.write_text(head + yaml.safe_dump(chosen.as_dict(), sort_keys=False), encoding="utf-8")


def plot(rows: list[dict], grid_rows: list[dict], plain_val: float, chosen: int, out_dir: Path) -> Path:
    """enhance.png: test accuracy per attribute before/after the chosen setting; the validation
    accuracy of every grid point against the plain model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
    names = [r["attribute"] for r in rows]
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [r["before"] for r in rows], 0.4, label="plain")
    axes[0].bar(x + 0.2, [r["after"] for r in rows], 0.4, label="enhanced")
    axes[0].set_xticks(x, names)
    axes[0].set_ylim(0, 1.2)
    axes[0].set_ylabel("recognition accuracy (test)")
    axes[0].legend(fontsize=8, loc="upper center", ncol=2)
    axes[0].set_title(grid_rows[chosen]["setting"], fontsize=9)
    means = [r[MEAN] for r in grid_rows]
    axes[1].plot(range(len(means)), means, marker=".", linestyle="", label="grid point")
    axes[1].axhline(plain_val, color="grey", linestyle="--", label="plain")
    axes[1].plot(
        [chosen], [means[chosen]], marker="*", markersize=12, linestyle="", color="C3", label="chosen"
    )
    axes[1].set_xlabel("grid point (enhance_grid.csv's order)")
    axes[1].set_ylabel("mean recognition accuracy (validation)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "enhance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(
    lalm: LALM,
    data,
    out_dir: Path,
    probes: Mapping,
    source_layers: Sequence[int],
    target_layers: Sequence[int | Sequence[int]],
    coefficients: Sequence[float],
    positions: Sequence[int] = (-1,),
    variant: str = "sake",
    samples: int = 100,
    batch_size: int = 16,
) -> dict:
    """Search the enhancement on the first `samples` validation instances of each attribute, then
    read the first `samples` test instances of each before and after the choice (see the module
    docstring for what is written)."""
    if lalm.enhancement is not None:
        raise ValueError("analyze.py enhance searches from the plain model: drop enhancement=")
    if variant not in VARIANTS:
        raise ValueError(f"analysis.run.variant: {variant!r} is none of {', '.join(VARIANTS)}")
    points = grid(source_layers, target_layers, coefficients, positions, lalm.edit_sites.num_llm_layers)
    prober = Prober.from_config(lalm, probes, SAKE_LABELS, spelled_as=data.eval_instances("val"))
    rate = lalm.sampling_rate
    split = lambda name: reliability_samples(data.eval_instances(name), data.audio_root, rate, samples)  # noqa: E731
    val = Recognition(prober, split("val"), variant, batch_size)
    plain_val = val.accuracy()
    scores = []
    with progress_bar("enhancement grid (validation)", len(points), unit="settings") as advance:
        for point in points:
            scores.append(val.accuracy(point))
            advance(1)
    best = choose(points, scores)
    chosen = points[best]
    test = Recognition(prober, split("test"), variant, batch_size)
    before, after = test.accuracy(), test.accuracy(chosen)

    out_dir.mkdir(parents=True, exist_ok=True)
    grid_rows = [
        {
            "setting": p.describe(),
            "source_layer": p.source_layer,
            "target_layers": " ".join(str(t) for t in p.target_layers),
            "coefficient": p.coefficient,
            "position": p.position,
            **{k: round(v, 4) for k, v in s.items()},
            "gain": round(s[MEAN] - plain_val[MEAN], 4),
        }
        for p, s in zip(points, scores, strict=True)
    ]
    write_csv(out_dir / "enhance_grid.csv", grid_rows)
    rows = comparison(before, after, test.counts)
    write_csv(out_dir / "enhance.csv", rows)
    setting = out_dir / "enhancement.yaml"
    commands = [
        f"python evaluate.py editor=none model={lalm.name} data={data.name} enhancement={setting}",
        f"python analyze.py lens model={lalm.name} data={data.name} enhancement={setting}",
    ]
    setting_file(setting, chosen, [
        f"AudioLens's enhancement chosen by `analyze.py enhance` for {lalm.name} on {data.name}'s",
        f"validation split (variant {variant}, {sum(val.counts.values())} samples): mean recognition",
        f"accuracy {scores[best][MEAN]:.4f}, plain {plain_val[MEAN]:.4f}.",
        "Use it with: " + commands[0],
    ])  # fmt: skip
    summary = {
        "model": lalm.name,
        "data": data.name,
        "variant": variant,
        "samples_per_attribute": samples,
        "samples": {"val": val.counts, "test": test.counts},
        "recognised": "the right label's first token leads the attribute's labels in the next-token "
        "distribution at the last prompt position",
        "chosen_by": "mean validation recognition accuracy over attributes; ties: smaller |coefficient|, "
        "then the first in grid order",
        "grid": {
            "source_layers": list(source_layers),
            "target_layers": [t if isinstance(t, int) else list(t) for t in target_layers],
            "coefficients": list(coefficients),
            "positions": list(positions),
            "points": [{**p.as_dict(), "val": s} for p, s in zip(points, scores, strict=True)],
        },
        "plain_val": plain_val,
        "chosen": {
            **chosen.as_dict(),
            "val": scores[best],
            "val_gain": scores[best][MEAN] - plain_val[MEAN],
            "beats_plain_on_val": scores[best][MEAN] > plain_val[MEAN],
        },
        "test": {
            "before": before,
            "after": after,
            "relative_gain": {k: relative_gain(before[k], after[k]) for k in before},
        },
        "setting_file": str(setting),
        "commands": commands,
    }
    (out_dir / "enhance.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    figure = plot(rows, grid_rows, plain_val[MEAN], best, out_dir)
    table = "; ".join(
        f"{r['attribute']} {r['before']:.3f} -> {r['after']:.3f}"
        + (f" ({r['relative_gain']:+.1%})" if r["relative_gain"] is not None else "")
        for r in rows
    )
    log.info("enhancement over %d grid points: chosen %s, validation mean %.4f (plain %.4f)",
             len(points), chosen.describe(), scores[best][MEAN], plain_val[MEAN])  # fmt: skip
    log.info("test recognition accuracy, plain -> enhanced: %s", table)
    log.info("setting: %s; use it with: %s", setting, " | ".join(commands))
    log.info("written: %s", ", ".join(str(out_dir / f) for f in ("enhance_grid.csv", "enhance.csv",
                                                                 "enhance.json", figure.name)))  # fmt: skip
    return summary

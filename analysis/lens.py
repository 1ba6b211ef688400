"""The logit lens on auditory attributes, as AudioLens reads it (Yang et al., arXiv 2506.05140).

For every probe (analysis/probes.py: SAKE's question or one of AudioLens's prompt variants) and
LLM decoder layer l, softmax(lm_head(final_norm(h_l))) over the whole vocabulary is read at the
probe's positions (-1, the predicting position; for `reversed` also the attribute-mentioning
one; any other by `positions`), at the first token of each of the attribute's labels.

Definitions (also written in lens.json's header):
- A sample is *recognised* when, at the predicting position of the last layer (= the model's own
  next-token distribution), its label's first token is the most probable of the labels'.
- The information score I^l of a group of samples at layer l and a position: the share of them
  whose label's first token is the most probable of the labels' under the lens there.
- A sample's own score at layer l, i^l: its label's probability normalised over the labels'
  distinct first tokens (chance: 1/|Y|, |Y| the number of distinct first tokens).
- The critical layer of a sample: sum_l l s^l / sum_l s^l with s^l = max(0, i^l - (1+alpha)/|Y|)
  (alpha = 0.2), layers counted from 0; undefined (and counted) when no layer is above the bar.
- Per attribute: the mean critical layer and the recognition accuracy; across attributes (and,
  with `compare`, across the attributes of other models' lens runs) their Pearson and Spearman
  correlations, with the p-value and the number of points.

With an editor (`ckpt=` or `editor=`), the first `edits` test instances of each attribute are
edited one at a time and every variant is read before and after: per layer, the probability of
the edit's target and of the original label show where the edit takes hold.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.probes import VARIANTS, Probe, Prober, leads, share
from analysis.samples import Sample, reliability_samples
from analysis.tables import write_csv
from common.progress import progress_bar
from datamodules.schema import SAKE_LABELS
from evaluation.sweep import request
from lalms.base import LALM

log = logging.getLogger(__name__)

HEADER = {
    "method": "logit lens (AudioLens): softmax(lm_head(final_norm(h_l))) over the vocabulary at a "
    "position, read at each label's first token",
    "recognised": "at the predicting position (-1) of the last layer the sample's label's first "
    "token is the most probable of the labels'",
    "information_score": "I^l = share of samples whose label's first token is the most probable "
    "of the labels' under the lens at layer l and the position",
    "sample_score": "i^l = the label's lens probability normalised over the labels' distinct first "
    "tokens (chance 1/|Y|)",
    "critical_layer": "sum_l l*s^l / sum_l s^l, s^l = max(0, i^l - (1+alpha)/|Y|), layers from 0; "
    "undefined when every s^l is 0",
    "correlation": "Pearson and Spearman between the mean critical layer and the recognition "
    "accuracy, one point per attribute (and per model with compare=)",
}


@dataclass(frozen=True)
class Reading:
    """One probe read at one position: per layer, the right label's probability, its share of
    the labels' probability, whether it leads them; and whether the model recognises it."""

    attribute: str
    variant: str
    position: str
    p_right: np.ndarray  # (layers,)
    share: np.ndarray  # (layers,)
    leads: np.ndarray  # (layers,) bool
    recognised: bool
    n_labels: int  # distinct first tokens of the attribute's labels (|Y|)
    shared_first_token: bool  # another label starts with the right label's first token


def critical_layer(scores: Sequence[float], n_labels: int, alpha: float = 0.2) -> float | None:
    """AudioLens's critical layer of one sample's score curve (layers from 0), None when no
    layer's score exceeds (1 + alpha) / n_labels."""
    s = np.clip(np.asarray(scores, dtype=float) - (1 + alpha) / n_labels, 0, None)
    if s.sum() <= 0:
        return None
    return float((np.arange(len(s)) * s).sum() / s.sum())


def correlation(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson and Spearman correlations with their two-sided p-values and the number of points
    (None where fewer than 3 points or a constant series leave them undefined)."""
    from scipy import stats

    n = len(x)
    out: dict = {"points": n, "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    out.update(
        pearson=round(float(pr.statistic), 4),
        pearson_p=round(float(pr.pvalue), 4),
        spearman=round(float(sr.statistic), 4),
        spearman_p=round(float(sr.pvalue), 4),
    )
    return out


class Lens:
    """Reads probes in batches (one forward per batch, every layer and position at once)."""

    def __init__(self, prober: Prober, batch_size: int = 16) -> None:
        self.prober, self.batch_size = prober, batch_size

    def readings(self, probes: Sequence[Probe], extra: Sequence[int] = ()) -> list[Reading]:
        """Every probe (one variant and attribute per call: they share their read positions) at
        its positions and at `extra` (counted from the end)."""
        if not probes:
            return []
        reads = [
            *probes[0].reads,
            *((f"pos{k}", k) for k in extra if k not in dict(probes[0].reads).values()),
        ]
        positions = [k for _, k in reads]
        out = []
        for start in range(0, len(probes), self.batch_size):
            part = probes[start : start + self.batch_size]
            for probe, p in zip(part, self.prober.label_probabilities(part, positions), strict=True):
                ids, right = self.prober.label_ids(probe), self.prober.right(probe)
                lead = leads(p, right, ids).cpu().numpy()  # (positions, layers)
                sh = share(p, right, ids).cpu().numpy()
                recognised = bool(lead[0, -1])  # reads[0] is the predicting position
                for j, (name, _) in enumerate(reads):
                    out.append(
                        Reading(
                            probe.attribute,
                            probe.variant,
                            name,
                            p[j, :, right].cpu().numpy(),
                            sh[j],
                            lead[j],
                            recognised,
                            len(set(ids)),
                            ids.count(ids[right]) > 1,
                        )
                    )
        return out


def groups(readings: Sequence[Reading]) -> dict[tuple[str, str, str], list[Reading]]:
    """Readings by (variant, position, attribute)."""
    out: dict[tuple[str, str, str], list[Reading]] = defaultdict(list)
    for r in readings:
        out[(r.variant, r.position, r.attribute)].append(r)
    return out


def curves(readings: Sequence[Reading]) -> list[dict]:
    """lens.csv's rows: per variant, position, attribute, group (all, correct = recognised,
    incorrect) and layer, the information score and the mean probability and share."""
    rows = []
    for (variant, position, attribute), mine in sorted(groups(readings).items()):
        for group, members in (
            ("all", mine),
            ("correct", [r for r in mine if r.recognised]),
            ("incorrect", [r for r in mine if not r.recognised]),
        ):
            if not members:
                continue
            lead, p, sh = (np.stack([getattr(r, k) for r in members]) for k in ("leads", "p_right", "share"))
            for layer in range(lead.shape[1]):
                rows.append(
                    {
                        "variant": variant,
                        "position": position,
                        "attribute": attribute,
                        "group": group,
                        "layer": layer,
                        "samples": len(members),
                        "information_score": round(float(lead[:, layer].mean()), 4),
                        "p_right": round(float(p[:, layer].mean()), 4),
                        "share": round(float(sh[:, layer].mean()), 4),
                    }
                )
    return rows


def critical_layers(readings: Sequence[Reading], alpha: float) -> dict[str, dict[str, dict]]:
    """Per variant@position and attribute: recognition accuracy, mean critical layer (over the
    samples where it is defined), how many samples it is undefined for."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (variant, position, attribute), mine in sorted(groups(readings).items()):
        layers = [critical_layer(r.share, r.n_labels, alpha) for r in mine]
        defined = [c for c in layers if c is not None]
        out[f"{variant}@{position}"][attribute] = {
            "samples": len(mine),
            "accuracy": round(float(np.mean([r.recognised for r in mine])), 4),
            "critical_layer": round(float(np.mean(defined)), 4) if defined else None,
            "critical_layer_undefined": len(layers) - len(defined),
            "shared_first_token": any(r.shared_first_token for r in mine),
        }
    return dict(out)


def correlations(critical: Mapping[str, Mapping[str, dict]], others: Mapping[str, Mapping] = ()) -> dict:
    """Per variant@position: the correlation across attributes of this run, and pooled with the
    same variant@position of every run in `others` (model name -> its lens.json's `critical`)."""
    out = {}
    for key, per_attribute in critical.items():
        points = {("this", a): v for a, v in per_attribute.items()}
        for model, crit in others.items():
            points.update({(model, a): v for a, v in crit.get(key, {}).items()})
        entry = {"attributes": _corr([v for (m, _), v in points.items() if m == "this"])}
        if others:
            entry["models_and_attributes"] = _corr(list(points.values()))
        out[key] = entry
    return out


def _corr(points: list[dict]) -> dict:
    kept = [p for p in points if p["critical_layer"] is not None]
    return correlation([p["critical_layer"] for p in kept], [p["accuracy"] for p in kept])


def read_compared(dirs: Sequence[str]) -> dict[str, dict]:
    """The `critical` section of other lens runs (their lens.json), by model name."""
    out = {}
    for d in dirs:
        path = Path(d) / "lens.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"analysis.run.compare: {path} does not exist (run analyze.py lens there first)"
            )
        summary = json.loads(path.read_text(encoding="utf-8"))
        if "critical" not in summary or "model" not in summary:
            raise ValueError(f"{path}: not a lens run of this version (no 'critical' / 'model' field)")
        out[f"{summary['model']} ({d})"] = summary["critical"]
    return out


def edit_shift(prober: Prober, editor, samples: Sequence[Sample], variants: Sequence[str]) -> list[dict]:
    """Per edit, variant and layer: p(target) and p(original) at the predicting position before
    and after the edit (each edit undone before the next)."""
    rows = []
    with progress_bar("lens before/after edits", len(samples)) as advance:
        for s in samples:
            inst, probes = s.instance, [prober.probe(s, v) for v in variants]
            before = [prober.read([p], [-1])[0, 0] for p in probes]
            handle = editor.apply(request(inst, s.prompt))
            try:
                after = [prober.read([p], [-1])[0, 0] for p in probes]
            finally:
                handle.undo()
            for probe, b, a in zip(probes, before, after, strict=True):
                target, original = prober.label_ids(probe, [inst.target, inst.original])
                tokens = {"target": target, "original": original}
                for layer in range(b.shape[0]):
                    rows.append(
                        {
                            "variant": probe.variant,
                            "attribute": inst.attribute,
                            "layer": layer,
                            **{
                                f"p_{k}_{when}": round(float(p[layer, t]), 6)
                                for k, t in tokens.items()
                                for when, p in (("before", b), ("after", a))
                            },
                        }
                    )
            advance(1)
    return rows


def mean_by(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Rows averaged over everything but `keys` (numeric columns only)."""
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        grouped[tuple(r[k] for k in keys)].append(r)
    values = [k for k, v in rows[0].items() if k not in keys and isinstance(v, (int, float))]
    return [
        {
            **dict(zip(keys, g, strict=True)),
            **{v: round(float(np.mean([r[v] for r in rs])), 4) for v in values},
        }
        for g, rs in sorted(grouped.items())
    ]


def plot(rows: list[dict], shift: list[dict] | None, out_dir: Path) -> list[Path]:
    """lens.png: one panel per variant@position, the information score per layer and attribute,
    solid for recognised samples, dashed for the others; lens_edit.png with an editor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["variant"], r["position"]) for r in rows}, key=lambda k: (VARIANTS.index(k[0]), k[1]))
    attributes = sorted({r["attribute"] for r in rows})
    colours = dict(zip(attributes, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    cols = min(3, len(panels))
    fig, axes = plt.subplots(
        (len(panels) + cols - 1) // cols,
        cols,
        figsize=(4.2 * cols, 3.4 * ((len(panels) + cols - 1) // cols)),
        squeeze=False,
        sharey=True,
    )
    for ax, (variant, position) in zip(axes.flat, panels, strict=False):
        for attribute in attributes:
            for group, style in (("correct", "-"), ("incorrect", "--")):
                mine = [
                    r
                    for r in rows
                    if (r["variant"], r["position"], r["attribute"], r["group"])
                    == (variant, position, attribute, group)
                ]
                if mine:
                    ax.plot(
                        [r["layer"] for r in mine],
                        [r["information_score"] for r in mine],
                        style,
                        marker="o",
                        color=colours[attribute],
                        label=attribute if group == "correct" else None,
                    )
        ax.set_title(f"{variant} @ {position}")
        ax.set_xlabel("LLM layer")
        ax.set_xticks(sorted({r["layer"] for r in rows}))
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("information score (share leading)")
    fig.suptitle(
        "information score per layer; solid: samples recognised at the output, dashed: not recognised"
    )
    fig.tight_layout()
    written = [out_dir / "lens.png"]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    if shift:
        variants = sorted({r["variant"] for r in shift}, key=VARIANTS.index)
        fig, axes = plt.subplots(
            1, len(variants), figsize=(4.2 * len(variants), 3.4), squeeze=False, sharey=True
        )
        for ax, variant in zip(axes[0], variants, strict=True):
            mine = [r for r in shift if r["variant"] == variant]
            layers = [r["layer"] for r in mine]
            for key, style, colour in (
                ("p_target_before", "--", "C1"),
                ("p_target_after", "-", "C1"),
                ("p_original_before", "--", "C0"),
                ("p_original_after", "-", "C0"),
            ):
                ax.plot(
                    layers,
                    [r[key] for r in mine],
                    style,
                    marker="o",
                    color=colour,
                    label=key[2:].replace("_", " "),
                )
            ax.set_title(variant)
            ax.set_xlabel("LLM layer")
            ax.set_xticks(sorted(set(layers)))
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("lens probability at the predicting position")
        fig.suptitle("before (dashed) and after (solid) each edit, mean over edits")
        fig.tight_layout()
        written.append(out_dir / "lens_edit.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def run(
    lalm: LALM,
    data,
    out_dir: Path,
    probes: Mapping,
    variants: Sequence[str] = VARIANTS,
    positions: Sequence[int] = (),
    samples: int = 50,
    alpha: float = 0.2,
    compare: Sequence[str] = (),
    edits: int = 5,
    batch_size: int = 16,
    editor=None,
) -> dict:
    """The lens over the first `samples` test instances of each attribute in every variant (and,
    with an editor, before and after editing the first `edits` of each): lens.csv, lens.json,
    lens.png (and lens_edit.csv, lens_edit.png)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"analysis.run.variants: unknown {unknown} (choose from {', '.join(VARIANTS)})")
    others = read_compared(compare)
    instances = data.eval_instances()
    prober = Prober.from_config(lalm, probes, SAKE_LABELS, spelled_as=instances)
    lens = Lens(prober, batch_size)
    items = reliability_samples(instances, data.audio_root, lalm.sampling_rate, samples)
    by_attribute: dict[str, list[Sample]] = defaultdict(list)
    for s in items:
        by_attribute[s.instance.attribute].append(s)
    readings: list[Reading] = []
    with progress_bar("logit lens", len(items) * len(variants), unit="probes") as advance:
        for variant in variants:
            for group in by_attribute.values():
                readings += lens.readings([prober.probe(s, variant) for s in group], positions)
                advance(len(group))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = curves(readings)
    write_csv(out_dir / "lens.csv", rows)
    critical = critical_layers(readings, alpha)
    summary: dict = {
        "header": {
            **HEADER,
            "alpha": alpha,
            "label_tokens": prober.label_tokens,
            "layers": len(prober.layers),
        },
        "model": lalm.name,
        "samples_per_attribute": samples,
        "critical": critical,
        "correlation": correlations(critical, others),
    }
    shift = None
    if editor is not None:
        edited = [s for group in by_attribute.values() for s in group[:edits]]
        shift_rows = edit_shift(prober, editor, edited, variants)
        write_csv(out_dir / "lens_edit.csv", shift_rows)
        shift = mean_by(shift_rows, ("variant", "layer"))
        summary["edit"] = {"edits": len(edited), "per_layer": shift}
    (out_dir / "lens.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plots = plot(rows, shift, out_dir)
    for key, corr in summary["correlation"].items():
        acc = {a: v["accuracy"] for a, v in critical[key].items()}
        crit = {a: v["critical_layer"] for a, v in critical[key].items()}
        log.info(
            "%s: accuracy %s, critical layer %s, across attributes %s", key, acc, crit, corr["attributes"]
        )
    log.info(
        "logit lens over %d readings: %s",
        len(readings),
        ", ".join(str(p) for p in [out_dir / "lens.csv", *plots]),
    )
    return summary

"""Logit lens on auditory attributes: from which LLM layer on does the model 'hear' the label?

For each LLM decoder layer and the last position of a probing prompt (the position that
predicts the answer), softmax(lm_head(final_norm(h))) is read at the first token of each of the
attribute's labels. The layer outputs are taken with forward hooks, i.e. before the final norm,
so the norm is applied to every layer alike (transformers' `hidden_states[-1]` would already
have it). Reported per attribute and layer: the mean probability of the right label's first
token, the share of samples where it is the most probable of the attribute's labels, and per
sample the layer from which on it stays so (`settles_at`; none if not at the last layer).

With an editor (`ckpt=` or `editor=`), the first `edits` test instances of each attribute are
edited one at a time and the lens is read on the edit prompt before and after: the per-layer
probability of the target and of the original label shows where the edit takes hold.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from analysis.samples import Sample, reliability_samples
from analysis.tables import write_csv
from common.progress import progress_bar
from common.prompt import Prompt
from datamodules.schema import SAKE_LABELS, norm_label
from evaluation.sweep import request
from lalms.base import IGNORE_INDEX, LALM, hidden
from lalms.hooks import Hook, hooked_all

log = logging.getLogger(__name__)


class LogitLens:
    def __init__(self, lalm: LALM) -> None:
        es = lalm.edit_sites
        if es.final_norm is None or es.lm_head is None:
            raise ValueError("the logit lens needs the model's final norm and lm_head (model.edit_sites.*)")
        self.lalm = lalm
        self.layers = [lalm.model.get_submodule(f"{es.llm_layers}.{i}") for i in range(es.num_llm_layers)]
        self.norm = lalm.model.get_submodule(es.final_norm)
        self.head = lalm.model.get_submodule(es.lm_head)

    def first_token(self, prompt: Prompt, label: str) -> int:
        """The first token of `label` as an answer to `prompt` (how the model would start it)."""
        labels = self.lalm.encode([prompt], [label])["labels"][0]
        return int(labels[labels != IGNORE_INDEX][0])

    @torch.no_grad()
    def probabilities(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """(samples, layers, vocab): the lens distribution at each layer's last position."""
        states: list[torch.Tensor] = []

        def keep(m, a, out):
            states.append(hidden(out)[:, -1])

        with hooked_all(Hook(layer, keep) for layer in self.layers):
            self.lalm.logits(self.lalm.to_device(self.lalm.encode(list(prompts))))
        stacked = torch.stack(states, dim=1)  # (B, L, d), before the final norm
        return self.head(self.norm(stacked)).float().softmax(-1)

    def read(self, samples: Sequence[Sample], labels: Sequence[str], batch_size: int = 16) -> list[dict]:
        """Per sample: p of the right label per layer, whether it leads the labels, settles_at."""
        out = []
        for start in range(0, len(samples), batch_size):
            part = samples[start : start + batch_size]
            probs = self.probabilities([s.prompt for s in part])
            for s, p in zip(part, probs, strict=True):
                right = self.first_token(s.prompt, s.truth)
                others = {
                    self.first_token(s.prompt, lab)
                    for lab in labels
                    if norm_label(lab) != norm_label(s.truth)
                }
                rivals = sorted(others - {right})
                p_right = p[:, right]
                leads = (
                    (p_right[:, None] > p[:, rivals]).all(-1)
                    if rivals
                    else torch.ones_like(p_right, dtype=torch.bool)
                )
                settles = None
                for layer in range(len(leads) - 1, -1, -1):
                    if not leads[layer]:
                        break
                    settles = layer
                out.append({"attribute": s.instance.attribute, "truth": s.truth, "p": p_right.tolist(),
                            "leads": leads.tolist(), "settles_at": settles,
                            "shared_first_token": right in others})  # fmt: skip
        return out


def per_attribute(reads: list[dict]) -> list[dict]:
    """Rows of (attribute, layer, mean p of the right label, share leading, samples)."""
    rows = []
    for attribute in sorted({r["attribute"] for r in reads}):
        mine = [r for r in reads if r["attribute"] == attribute]
        p, leads = np.array([r["p"] for r in mine]), np.array([r["leads"] for r in mine])
        for layer in range(p.shape[1]):
            rows.append({"attribute": attribute, "layer": layer,
                         "p_right": round(float(p[:, layer].mean()), 4),
                         "leads": round(float(leads[:, layer].mean()), 4), "samples": len(mine)})  # fmt: skip
    return rows


def settling(reads: list[dict]) -> dict[str, dict]:
    """Per attribute: the median layer at which the right label settles as the leader, and the
    share of samples where it leads at the last layer."""
    out = {}
    for attribute in sorted({r["attribute"] for r in reads}):
        mine = [r for r in reads if r["attribute"] == attribute]
        settled = [r["settles_at"] for r in mine if r["settles_at"] is not None]
        out[attribute] = {"median_settles_at": float(np.median(settled)) if settled else None,
                          "leads_at_last_layer": round(len(settled) / len(mine), 4),
                          "samples": len(mine),
                          "shared_first_token": any(r["shared_first_token"] for r in mine)}  # fmt: skip
    return out


def edit_shift(lens: LogitLens, editor, samples: Sequence[Sample]) -> list[dict]:
    """Per sample and layer: p(target) and p(original) on the edit prompt before and after the edit."""
    rows = []
    with progress_bar("lens before/after edits", len(samples)) as advance:
        for s in samples:
            inst = s.instance
            tokens = {
                k: lens.first_token(s.prompt, v)
                for k, v in (("target", inst.target), ("original", inst.original))
            }
            before = lens.probabilities([s.prompt])[0]
            handle = editor.apply(request(inst, s.prompt))
            try:
                after = lens.probabilities([s.prompt])[0]
            finally:
                handle.undo()
            for layer in range(before.shape[0]):
                rows.append({"attribute": inst.attribute, "layer": layer,
                             **{f"p_{k}_{when}": float(p[layer, t]) for k, t in tokens.items()
                                for when, p in (("before", before), ("after", after))}})  # fmt: skip
            advance(1)
    return rows


def mean_by(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    values = [k for k in rows[0] if k not in keys and k != "attribute"]
    out = []
    for g, rs in sorted(groups.items()):
        means = {v: round(float(np.mean([r[v] for r in rs])), 4) for v in values}
        out.append({**dict(zip(keys, g, strict=True)), **means})
    return out


def plot(rows: list[dict], shift: list[dict] | None, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for attribute in sorted({r["attribute"] for r in rows}):
        mine = [r for r in rows if r["attribute"] == attribute]
        axes[0].plot([r["layer"] for r in mine], [r["p_right"] for r in mine], marker="o", label=attribute)
        axes[1].plot([r["layer"] for r in mine], [r["leads"] for r in mine], marker="o", label=attribute)
    axes[0].set_ylabel("p(right label's first token)")
    axes[1].set_ylabel("share where it leads the labels")
    for ax in axes:
        ax.set_xlabel("LLM layer")
        ax.set_xticks(sorted({r["layer"] for r in rows}))
        ax.legend()
    fig.tight_layout()
    written.append(out_dir / "lens.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if shift:
        fig, ax = plt.subplots(figsize=(6, 4))
        layers = [r["layer"] for r in shift]
        for key, style in (("p_target_before", "--"), ("p_target_after", "-"), ("p_original_before", ":"),
                           ("p_original_after", "-.")):  # fmt: skip
            ax.plot(layers, [r[key] for r in shift], style, marker="o", label=key[2:].replace("_", " "))
        ax.set_xlabel("LLM layer")
        ax.set_xticks(sorted({r["layer"] for r in rows}))
        ax.set_ylabel("lens probability on the edit prompt")
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "lens_edit.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def run(
    lalm: LALM, data, out_dir: Path, samples: int = 50, edits: int = 5, editor=None, batch_size: int = 16
) -> dict:
    """The lens over the first `samples` test instances of each attribute (and, with an editor,
    before and after editing the first `edits` of each); CSVs, plots and lens.json."""
    lens = LogitLens(lalm)
    items = reliability_samples(data.eval_instances(), data.audio_root, lalm.sampling_rate, samples)
    by_attribute: dict[str, list[Sample]] = defaultdict(list)
    for s in items:
        by_attribute[s.instance.attribute].append(s)
    reads = []
    with progress_bar("logit lens", len(items), unit="samples") as advance:
        for attribute, group in by_attribute.items():
            reads += lens.read(group, SAKE_LABELS[attribute], batch_size)
            advance(len(group))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = per_attribute(reads)
    write_csv(out_dir / "lens.csv", rows)
    summary = {"settling": settling(reads)}
    shift = None
    if editor is not None:
        shift_rows = edit_shift(lens, editor, [s for group in by_attribute.values() for s in group[:edits]])
        write_csv(out_dir / "lens_edit.csv", shift_rows)
        shift = mean_by(shift_rows, ("layer",))
        summary["edit"] = shift
    (out_dir / "lens.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plots = plot(rows, shift, out_dir)
    log.info("logit lens over %d samples: %s; %s", len(reads), json.dumps(summary["settling"]),
             ", ".join(str(p) for p in [out_dir / "lens.csv", *plots]))  # fmt: skip
    return summary

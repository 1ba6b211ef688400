"""Token-wise information flow by attention knockout: where does the predicting position read an
auditory attribute from, the audio positions directly or text positions that already absorbed it?

Following Geva et al. 2023 ("Dissecting recall of factual associations in auto-regressive
language models"), the attention edges from the predicting position (the last position of a
probing prompt, analysis/probes.py) to one set of source positions are blocked in a window of
k consecutive LLM decoder layers (k = max(1, round(window_fraction * layers))), the window slid
over the depth (starts 0..layers-k), and the drop of the right label's probability, and of the
recognition accuracy, is recorded per (source, window). Sources, per batch row:

- `audio`: the positions holding the audio placeholder token (the clip's rows in the LLM);
- `attribute`: the tokens of the attribute word (the probes' `Phrasing.word`, e.g. "emotion")
  anywhere after the last audio position (the question or the prefilled reply), found as a
  token subsequence with and without a leading space;
- `text`: every position after the last audio position and before the predicting one;
- `scaffolding` (the control): the template positions before the first audio position, except
  the row's first real token. That one is kept: it is the attention sink most heads park their
  weight on, and blocking it breaks any model whatever the attribute (the drop would measure
  the damage, not a flow).

A row whose source set is empty (e.g. the `sake` question does not name the attribute) is left
out of that source's figures, and counted. p is the softmax over the vocabulary of the model's
logits at the last position, read at the first token of the right label (as `Prober.label_ids`
gives it, the labels spelled as the data writes them: `analysis.probes.spelled_labels`);
accuracy is whether the right label leads the attribute's labels (`probes.leads`).

With an editor, the first `edits` instances of each attribute are knocked out on their edit
prompt's probe before the edit (p of the instance's original label) and after it (p of its
target): where the edited answer is read from.

Cost: one forward per (source, window, batch) plus one clean forward per batch, i.e.
1 + sources x (layers - k + 1) batched forwards for every `batch_size` samples (the output
projection sees the last position only); with an editor, twice that per edit, unbatched.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.probes import Probe, Prober, leads
from analysis.samples import Sample, reliability_samples
from analysis.tables import write_csv
from common.progress import progress_bar
from datamodules.schema import SAKE_LABELS
from evaluation.sweep import request
from lalms.attention import blocked_attention
from lalms.base import LALM, last_position_only
from lalms.hooks import hooked

log = logging.getLogger(__name__)
SOURCES = ("audio", "attribute", "text", "scaffolding")
ACCURACIES = ("accuracy_clean", "accuracy_blocked")
MEASURES = ("p_clean", "p_blocked", "change_pct", *ACCURACIES)

METHOD = (
    "Attention knockout (Geva et al. 2023): the attention edges from the predicting (last) "
    "position to one source set of positions are blocked in a window of k consecutive LLM "
    "decoder layers, slid over the depth; p is the softmax over the vocabulary at the last "
    "position, read at the right label's first token."
)
DEFINITIONS = {
    "audio": "positions holding the audio placeholder token",
    "attribute": "the attribute word's tokens after the last audio position (question or prefilled reply)",
    "text": "every position after the last audio position and before the predicting position",
    "scaffolding": "the positions before the first audio position except the row's first real token "
    "(the attention sink, kept: blocking it breaks any model); the control",
    "window_start, window_end": "the first and last LLM layer (0-based) of the blocked window",
    "samples": "rows whose source set is not empty (the others are left out and counted)",
    "p_clean, p_blocked": "mean probability of the right label's first token without and with the block",
    "change_pct": "100 * (p_blocked - p_clean) / p_clean, of the means (negative: a drop)",
    "accuracy_clean, accuracy_blocked": "share of rows where the right label leads the attribute's labels",
}


def window_size(layers: int, fraction: float) -> int:
    """k = max(1, round(fraction * layers)) consecutive layers per window."""
    if not 0 < fraction <= 1:
        raise ValueError(f"window_fraction must be in (0, 1], got {fraction}")
    return min(layers, max(1, round(fraction * layers)))


def layer_windows(layers: int, k: int) -> list[range]:
    """The windows of k consecutive layers, starting at 0..layers-k."""
    return [range(start, start + k) for start in range(layers - k + 1)]


def occurrences(row: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """The start of every occurrence of the token sequence `pattern` in `row`."""
    n = len(pattern)
    if n == 0:
        return []
    return [i for i in range(len(row) - n + 1) if list(row[i : i + n]) == list(pattern)]


@dataclass(frozen=True)
class Reading:
    """One row under one block: the right label's probability and whether it leads."""

    p: float
    leads: bool


class Knockout:
    """Source sets of probe batches, and the right label's probability with them blocked."""

    def __init__(
        self, lalm: LALM, prober: Prober, sources: Sequence[str] = SOURCES, window_fraction: float = 0.2
    ) -> None:
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown or not sources:
            raise ValueError(f"knockout sources must be some of {', '.join(SOURCES)}; got {list(sources)}")
        self.lalm, self.prober, self.sources = lalm, prober, tuple(sources)
        self.layers = lalm.edit_sites.num_llm_layers
        self.k = window_size(self.layers, window_fraction)
        self.windows = layer_windows(self.layers, self.k)
        es = lalm.edit_sites
        self.head = lalm.model.get_submodule(es.lm_head) if es.lm_head else None

    @property
    def forwards_per_batch(self) -> int:
        """1 clean + one per (source, window)."""
        return 1 + len(self.sources) * len(self.windows)

    def word_ids(self, attribute: str) -> list[list[int]]:
        """The attribute word's tokens, with a leading space and without (distinct)."""
        word = self.prober.phrasing(attribute).word
        out: list[list[int]] = []
        for text in (f" {word}", word):
            ids = self.prober.ids(text)
            if ids and ids not in out:
                out.append(ids)
        return out

    def source_sets(
        self, probes: Sequence[Probe], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """source -> (B, T) bool: the key positions of each row in that source (left padded rows:
        the predicting position is the last one of every row)."""
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        rows, width = ids.shape
        last_pos = width - 1
        out = {s: torch.zeros(rows, width, dtype=torch.bool) for s in self.sources}
        for b, probe in enumerate(probes):
            audio = (ids[b] == self.lalm.audio_token_id).nonzero().flatten()
            if len(audio) == 0:
                raise ValueError(
                    f"probe row {b} ({probe.attribute}) holds no audio token; the knockout needs the clip"
                )
            first, last = int(audio[0]), int(audio[-1])
            start = int(mask[b].nonzero()[0])  # the row's first real token (left padding before it)
            if "audio" in out:
                out["audio"][b, audio] = True
            if "text" in out:
                out["text"][b, last + 1 : last_pos] = True
            if "scaffolding" in out:
                out["scaffolding"][b, start + 1 : first] = True
            if "attribute" in out:
                after = ids[b, last + 1 : last_pos].tolist()
                for pattern in self.word_ids(probe.attribute):
                    for at in occurrences(after, pattern):
                        out["attribute"][b, last + 1 + at : last + 1 + at + len(pattern)] = True
        return out

    @torch.no_grad()
    def label_probabilities(
        self,
        batch: Mapping[str, torch.Tensor],
        label_ids: Sequence[Sequence[int]],
        layers: Sequence[int] = (),
        blocked: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Per row, the probability (softmax over the vocabulary at the last position) of each
        label's first token, with `blocked` knocked out in `layers` (none: the clean run)."""
        lalm = self.lalm
        block = blocked_attention(lalm, layers, blocked) if blocked is not None else nullcontext()
        last_only = (
            hooked(self.head, last_position_only, pre=True) if self.head is not None else nullcontext()
        )
        with block, last_only:
            logits = lalm.logits(batch)[:, -1].float()
        probs = logits.softmax(-1).cpu()
        return [probs[b, list(ids)] for b, ids in enumerate(label_ids)]

    def knock(
        self, probes: Sequence[Probe], rights: Sequence[int], advance=lambda n: None
    ) -> tuple[list[dict], dict[str, int]]:
        """The knockout of one batch of probes, `rights[b]` the index of the label read for row b.
        Returns per (source, window, row with a non-empty source set) a record, and per source
        the rows left out (empty set)."""
        lalm = self.lalm
        encoded = self.prober.encode(probes)
        sets = self.source_sets(probes, encoded)
        batch = lalm.to_device(encoded)
        label_ids = [self.prober.label_ids(p) for p in probes]

        def readings(probs: list[torch.Tensor]) -> list[Reading]:
            rows = zip(probs, rights, label_ids, strict=True)
            return [Reading(float(p[r]), bool(leads(p, r, ids))) for p, r, ids in rows]

        clean = readings(self.label_probabilities(batch, label_ids))
        advance(1)
        records, left_out = [], {}
        for source in self.sources:
            blocked = sets[source]
            kept = blocked.any(-1).tolist()
            left_out[source] = kept.count(False)
            for window in self.windows:
                if not any(kept):
                    advance(1)
                    continue
                hit = readings(self.label_probabilities(batch, label_ids, window, blocked))
                for b, keep in enumerate(kept):
                    if keep:
                        records.append(
                            {
                                "source": source,
                                "window_start": window[0],
                                "window_end": window[-1],
                                "row": b,
                                "p_clean": clean[b].p,
                                "p_blocked": hit[b].p,
                                "accuracy_clean": clean[b].leads,
                                "accuracy_blocked": hit[b].leads,
                            }
                        )
                advance(1)
        return records, left_out


def aggregate(records: list[dict], knockout: Knockout) -> list[dict]:
    """Per (source, window): samples, mean p clean and blocked, their relative change, accuracies."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["source"], r["window_start"])].append(r)
    rows = []
    for source in knockout.sources:
        for window in knockout.windows:
            mine = groups.get((source, window[0]), [])
            if not mine:
                continue
            p_clean = float(np.mean([r["p_clean"] for r in mine]))
            p_blocked = float(np.mean([r["p_blocked"] for r in mine]))
            change = 100 * (p_blocked - p_clean) / p_clean if p_clean > 0 else float("nan")
            accuracy = {k: round(float(np.mean([r[k] for r in mine])), 4) for k in ACCURACIES}
            rows.append(
                {
                    "source": source,
                    "window_start": window[0],
                    "window_end": window[-1],
                    "samples": len(mine),
                    "p_clean": round(p_clean, 6),
                    "p_blocked": round(p_blocked, 6),
                    "change_pct": round(change, 3),
                    **accuracy,
                }
            )
    return rows


def edit_knockout(
    knockout: Knockout, editor, samples: Sequence[Sample], variant: str
) -> tuple[list[dict], dict]:
    """Per (source, window): the knockout of each edit prompt's probe before the edit (p of the
    original label) and after it (p of the target), averaged over the edits."""
    prober = knockout.prober
    before, after, left_out = [], [], defaultdict(int)
    with progress_bar("knockout before/after edits", len(samples) * 2 * knockout.forwards_per_batch,
                      unit="forwards") as advance:  # fmt: skip
        for s in samples:
            inst, probe = s.instance, prober.probe(s, variant)
            records, empty = knockout.knock([probe], [prober.right(probe, inst.original)], advance)
            before += records
            for source, n in empty.items():
                left_out[source] += n
            handle = editor.apply(request(inst, s.prompt))
            try:
                after += knockout.knock([probe], [prober.right(probe, inst.target)], advance)[0]
            finally:
                handle.undo()
    rows = []
    after_rows = {(r["source"], r["window_start"]): r for r in aggregate(after, knockout)}
    for b in aggregate(before, knockout):
        a = after_rows[(b["source"], b["window_start"])]
        window = {k: b[k] for k in ("source", "window_start", "window_end")}
        rows.append(
            {
                **window,
                "edits": b["samples"],
                **{f"{k}_before": b[k] for k in MEASURES},
                **{f"{k}_after": a[k] for k in MEASURES},
            }
        )
    return rows, dict(left_out)


def plot(rows: list[dict], edit_rows: list[dict] | None, knockout: Knockout, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [w[0] for w in knockout.windows]
    colours = {s: f"C{i}" for i, s in enumerate(SOURCES)}
    written = []
    figures = [("knockout.png", rows, (("change_pct", "-", ""),),
                "change of p(right label) in %")]  # fmt: skip
    if edit_rows:
        curves = (
            ("change_pct_before", "--", " before (original)"),
            ("change_pct_after", "-", " after (target)"),
        )
        ylabel = "change of p(original before / target after edit) in %"
        figures.append(("knockout_edit.png", edit_rows, curves, ylabel))
    for name, table, curves, ylabel in figures:
        fig, ax = plt.subplots(figsize=(7, 4))
        for source in knockout.sources:
            mine = [r for r in table if r["source"] == source]
            for key, style, suffix in curves:
                ax.plot([r["window_start"] for r in mine], [r[key] for r in mine], style, marker="o",
                        color=colours[source], label=f"{source}{suffix}")  # fmt: skip
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xlabel(f"first LLM layer of the blocked window (k = {knockout.k} layers)")
        ax.set_xticks(starts)
        ax.set_ylabel(ylabel)
        ax.set_title("attention knockout from the predicting position")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def run(
    lalm: LALM,
    data,
    out_dir: Path,
    probes: Mapping,
    variant: str = "sake",
    sources: Sequence[str] = SOURCES,
    window_fraction: float = 0.2,
    samples: int = 50,
    batch_size: int = 16,
    edits: int = 5,
    editor=None,
) -> dict:
    """The knockout over the probes (in `variant`) of the first `samples` test instances of each
    attribute, and with an editor before and after editing the first `edits` of each; writes
    knockout.csv, knockout.json, knockout.png (and knockout_edit.csv / .png)."""
    instances = data.eval_instances()
    prober = Prober.from_config(lalm, probes, SAKE_LABELS, spelled_as=instances)
    knockout = Knockout(lalm, prober, list(sources), window_fraction)
    items = reliability_samples(instances, data.audio_root, lalm.sampling_rate, samples)
    if not items:
        raise ValueError("knockout: the data has no test instances to probe")
    probed = [prober.probe(s, variant) for s in items]
    records, left_out = [], dict.fromkeys(knockout.sources, 0)
    batches = range(0, len(probed), batch_size)
    with progress_bar(
        "attention knockout", len(batches) * knockout.forwards_per_batch, unit="forwards"
    ) as advance:
        for start in batches:
            part = probed[start : start + batch_size]
            rights = [prober.right(p) for p in part]
            found, empty = knockout.knock(part, rights, advance)
            records += [{**r, "row": start + r["row"]} for r in found]
            for source, n in empty.items():
                left_out[source] += n
    rows = aggregate(records, knockout)
    if not rows:
        raise RuntimeError(f"knockout: every source set was empty for all {len(items)} samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "knockout.csv", rows)
    summary = {"method": METHOD, "definitions": DEFINITIONS, "variant": variant,
               "label_tokens": prober.label_tokens, "layers": knockout.layers, "window": knockout.k,
               "window_fraction": window_fraction, "windows": [[w[0], w[-1]] for w in knockout.windows],
               "samples": len(items), "left_out": left_out, "rows": rows}  # fmt: skip
    edit_rows = None
    if editor is not None:
        chosen: dict[str, list[Sample]] = defaultdict(list)
        for s in items:
            if len(chosen[s.instance.attribute]) < edits:
                chosen[s.instance.attribute].append(s)
        edit_rows, edit_left_out = edit_knockout(
            knockout, editor, [s for g in chosen.values() for s in g], variant
        )
        write_csv(out_dir / "knockout_edit.csv", edit_rows)
        summary["edit"] = {"edits": sum(len(g) for g in chosen.values()), "left_out": edit_left_out,
                           "rows": edit_rows}  # fmt: skip
    (out_dir / "knockout.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plots = plot(rows, edit_rows, knockout, out_dir)
    strongest = {
        source: min((r for r in rows if r["source"] == source), key=lambda r: r["change_pct"])
        for source in knockout.sources
        if any(r["source"] == source for r in rows)
    }
    drops = ", ".join(
        f"{s} {r['change_pct']:+.1f}% at layers {r['window_start']}-{r['window_end']}"
        for s, r in strongest.items()
    )
    log.info(
        "attention knockout (%s probes, %d samples, windows of %d of %d layers); largest drop per source: "
        "%s; left out (empty source set): %s; %s",
        variant, len(items), knockout.k, knockout.layers, drops, json.dumps(left_out),
        ", ".join(str(p) for p in [out_dir / "knockout.csv", *plots]),
    )  # fmt: skip
    return summary

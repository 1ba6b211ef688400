"""Speech-aware causal tracing: which layers and positions carry an auditory attribute.

For an audio question the model answers right (greedy decoding gives the label):
1. clean run: every traced module's output is recorded;
2. corrupted run: Gaussian noise, `noise` times the standard deviation of the clean values, is
   added to the audio representation at an early point (`corrupt_at`): the output of the audio
   encoder's convolutional stem (`audio_conv`: Whisper's conv2, before its GELU), the input of
   the first audio-encoder layer (`audio_input`: after the convolutions and positions), or the
   connector's output (`connector`: the audio rows the LLM reads). Every frame, or with a `span`
   (start, end in seconds of the clip: a spoken subject) only the frames that overlap it, the
   noise then scaled by the clean span's standard deviation;
3. restored runs: corrupted, but the clean output of one window of `window` consecutive layers
   (centred on a layer) is written back at one position. Traced per layer are the block output
   (`residual`), the MLP output (`mlp`; fc2 in Whisper-style audio layers) and the attention
   output (`attn`), in the audio encoder (positions: encoder frames) and in the LLM (positions:
   tokens).
Indirect effect IE = p(answer | restored) - p(answer | corrupted), p the probability of the
answer's first token at the last prompt position. The restored runs of one sample are batched:
each batch row carries its own (module window, position) restoration.

Positions are grouped so that samples of different lengths average together: LLM tokens before
the audio (`prefix`), the audio rows in `bins` equal parts (`audio1`..), the question after
the audio (`question`) and the last token (`last`); audio-encoder frames in `bins` equal parts
of the clip's valid frames (`frames1`..). `position_stride` traces every n-th position inside a
group (always the last token) to bound the cost on real models.

With `words` (group name -> (start, end) in seconds, e.g. the first and last subject word and
the prompt's last word), the groups are those words instead: in each tower the positions that
overlap a word are restored together, in one run per (window, word); the LLM's last token is a
group of its own. Encoder frame k spans [k, k+1) x feature hop x the stem's stride (Whisper:
20 ms); the LLM's audio rows divide the clip's duration evenly.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from analysis.samples import FactSample, fact_samples, reliability_samples
from analysis.tables import write_csv
from common.progress import progress_bar
from common.prompt import Prompt
from datamodules.spoken_facts import ANCHORS, SpokenFactsData
from lalms.base import IGNORE_INDEX, LALM, greedy_hits, hidden, with_hidden
from lalms.edit_sites import audio_stem
from lalms.hooks import Hook, hooked_all
from lalms.spans import frame_seconds, span_frames, span_rows

log = logging.getLogger(__name__)
COMPONENTS = ("residual", "mlp", "attn")
CORRUPT_AT = ("audio_conv", "audio_input", "connector")


@dataclass(frozen=True)
class TracedSite:
    """A traced module: tower ('audio' or 'llm'), component, layer, module path."""

    tower: str
    component: str
    layer: int
    path: str


def traced_sites(lalm: LALM) -> list[TracedSite]:
    """The block, MLP and attention outputs of every audio-encoder and LLM layer."""
    sites = []
    es = lalm.edit_sites
    for tower, base, count in (
        ("audio", es.audio_layers, es.num_audio_layers),
        ("llm", es.llm_layers, es.num_llm_layers),
    ):
        for i in range(count):
            block = lalm.model.get_submodule(f"{base}.{i}")
            mlp = "mlp" if hasattr(block, "mlp") else "fc2"  # Whisper-style layers: fc1/fc2, no mlp module
            for component, sub in (("residual", ""), ("mlp", f".{mlp}"), ("attn", ".self_attn")):
                sites.append(TracedSite(tower, component, i, f"{base}.{i}{sub}"))
    return sites


def windows(count: int, window: int) -> list[range]:
    """For each layer, the `window` consecutive layers centred on it (clipped to the model)."""
    out = []
    for centre in range(count):
        start = min(max(0, centre - window // 2), max(0, count - window))
        out.append(range(start, min(count, start + window)))
    return out


def bins(n: int, parts: int, prefix: str) -> list[str]:
    """The group name of each of n positions split into `parts` equal parts."""
    return [f"{prefix}{min(parts - 1, i * parts // max(n, 1)) + 1}" for i in range(n)]


@dataclass
class SampleTrace:
    """The outcome of tracing one sample."""

    p_clean: float
    p_corrupted: float
    # (tower, component, layer, group) -> indirect effects of the positions in that group
    effects: dict[tuple[str, str, int, str], list[float]] = field(default_factory=lambda: defaultdict(list))


class CausalTracer:
    def __init__(
        self,
        lalm: LALM,
        *,
        corrupt_at: str,
        noise: float,
        window: int,
        bins: int,
        position_stride: int,
        batch_size: int,
        min_drop: float,
        seed: int,
        known_only: bool,
    ) -> None:  # the values: configs/analysis/trace.yaml (window, position_stride: tuning/)
        if corrupt_at not in CORRUPT_AT:
            raise ValueError(f"corrupt_at must be one of {', '.join(CORRUPT_AT)}, got {corrupt_at!r}")
        if lalm.edit_sites.audio_layers is None and corrupt_at != "connector":
            raise ValueError(f"corrupt_at={corrupt_at} needs audio-encoder layers; this model has none found")
        self.lalm, self.corrupt_at, self.noise, self.window = lalm, corrupt_at, noise, window
        self.bins, self.stride, self.batch_size, self.seed = bins, position_stride, batch_size, seed
        self.min_drop, self.known_only = min_drop, known_only
        self.sites = traced_sites(lalm)
        if corrupt_at == "connector":  # noise after the encoder: its layers cannot restore it
            self.sites = [s for s in self.sites if s.tower == "llm"]
        self.modules = {s.path: lalm.model.get_submodule(s.path) for s in self.sites}
        if lalm.edit_sites.audio_layers is not None:
            self.stem, _ = audio_stem(lalm.model, lalm.edit_sites)
            self.frame_seconds = frame_seconds(lalm)  # one encoder frame

    def span_frames(self, span: tuple[float, float], frames: int) -> range:
        """The encoder frames (of `frames`) that overlap `span` (seconds): at least one."""
        return span_frames(span, frames, self.frame_seconds)

    # ------------------------------------------------------------------ runs
    def _corruption(self, noise: torch.Tensor | None, record: dict) -> Hook:
        """The hook that adds `noise` to the audio representation (or, noise None, records it)."""

        def add(x: torch.Tensor) -> torch.Tensor:
            if noise is None:
                record["clean"] = x.detach()
                return x
            return x + noise.to(x.dtype)

        if self.corrupt_at == "connector":
            module = self.lalm.model.get_submodule(self.lalm.edit_sites.connector)
            return Hook(module, lambda m, a, out: with_hidden(out, add(hidden(out))))
        if self.corrupt_at == "audio_conv":
            return Hook(self.lalm.model.get_submodule(self.stem), lambda m, a, out: add(out))
        module = self.lalm.model.get_submodule(f"{self.lalm.edit_sites.audio_layers}.0")

        def pre(m, args, kwargs):
            if args:
                return (add(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: add(kwargs[key])}

        return Hook(module, pre, pre=True, with_kwargs=True)

    def _run(
        self, batch, corrupt: torch.Tensor | None, restore: Sequence[tuple[set[str], Sequence[int]]] = ()
    ):
        """p(answer) rows of one forward; `restore[b]` = (module paths, positions) for row b."""
        clean_out: dict = {}
        record: dict = {}
        hooks = [self._corruption(corrupt, record)]
        for path, module in self.modules.items():
            if corrupt is None:  # the clean run records every traced output
                hooks.append(Hook(module, self._recorder(path, clean_out)))
                continue
            rows = [(b, p) for b, (paths, pos) in enumerate(restore) if path in paths for p in pos]
            if rows:
                hooks.append(Hook(module, self._restorer(path, rows)))
        with hooked_all(hooks), torch.no_grad():
            logits = self.lalm.logits(batch)[:, -1].float()
        return logits.softmax(-1), clean_out, record

    @staticmethod
    def _recorder(path: str, into: dict):
        def hook(m, args, out):
            into[path] = hidden(out).detach()

        return hook

    def _restorer(self, path: str, rows: list[tuple[int, int]]):
        b = torch.tensor([r for r, _ in rows])
        pos = torch.tensor([p for _, p in rows])

        def hook(m, args, out):
            h = hidden(out).clone()
            h[b, pos] = self._clean[path][0, pos].to(h.dtype)
            return with_hidden(out, h)

        return hook

    # ------------------------------------------------------------------ one sample
    def positions(
        self,
        batch,
        clean: dict[str, torch.Tensor],
        words: Mapping[str, tuple[float, float]] | None = None,
        seconds: float = 0.0,
    ) -> dict[str, list[tuple[list[int], str]]]:
        """tower -> [(positions restored together, group)] traced in that tower: one position at
        a time in groups of equal parts, or with `words` each word's positions together
        (`seconds`: the clip's duration)."""
        if words is not None:
            return self.word_positions(batch, clean, words, seconds)
        ids = batch["input_ids"][0]
        real = int(batch["attention_mask"][0].sum())
        start = len(ids) - real  # left padding
        audio = (ids == self.lalm.audio_token_id).nonzero().flatten().tolist()
        llm: list[tuple[int, str]] = []
        if audio:
            first, last = audio[0], audio[-1]
            llm += [(p, "prefix") for p in range(start, first)]
            llm += list(zip(audio, bins(len(audio), self.bins, "audio"), strict=True))
            llm += [(p, "question") for p in range(last + 1, len(ids) - 1)]
        else:
            llm += [(p, "question") for p in range(start, len(ids) - 1)]
        llm = self._strided(llm) + [(len(ids) - 1, "last")]
        out = {"llm": [([p], g) for p, g in llm]}
        audio_sites = [s for s in self.sites if s.tower == "audio"]
        if audio_sites:
            frames = clean[audio_sites[0].path].shape[1]
            valid = self._valid_frames(batch, frames)
            places = self._strided(list(zip(range(valid), bins(valid, self.bins, "frames"), strict=True)))
            out["audio"] = [([p], g) for p, g in places]
        return out

    def word_positions(
        self, batch, clean: dict[str, torch.Tensor], words: Mapping[str, tuple[float, float]], seconds: float
    ) -> dict[str, list[tuple[list[int], str]]]:
        ids = batch["input_ids"][0]
        audio = (ids == self.lalm.audio_token_id).nonzero().flatten().tolist()
        if not audio or seconds <= 0:
            raise ValueError("tracing by word needs a prompt with one clip of known duration")
        if "last" in words:
            raise ValueError("'last' is the predicting token's group; name the word otherwise (last_word)")
        llm = [(span_rows(span, audio, seconds), group) for group, span in words.items()]
        out = {"llm": [*llm, ([len(ids) - 1], "last")]}
        audio_sites = [s for s in self.sites if s.tower == "audio"]
        if audio_sites:
            frames = clean[audio_sites[0].path].shape[1]
            out["audio"] = [(list(self.span_frames(w, frames)), g) for g, w in words.items()]
        return out

    def _strided(self, positions: list[tuple[int, str]]) -> list[tuple[int, str]]:
        kept, seen = [], defaultdict(int)
        for pos, group in positions:
            if seen[group] % self.stride == 0:
                kept.append((pos, group))
            seen[group] += 1
        return kept

    @staticmethod
    def _valid_frames(batch, frames: int) -> int:
        """The encoder frames that hold the clip: from a feature-level mask if the family's
        processor gives one (e.g. `feature_attention_mask`), else all of them."""
        for key, value in batch.items():
            if key != "attention_mask" and key.endswith("attention_mask") and value.dim() == 2:
                total = value.shape[1]
                return max(1, min(frames, -(-int(value[0].sum()) * frames // total)))
        return frames

    def noise_for(self, clean: torch.Tensor, span: tuple[float, float] | None) -> torch.Tensor:
        """The corruption's noise for the clean representation `clean` (every frame, or those of
        `span` only, scaled by their clean standard deviation)."""
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(clean.shape, generator=g)
        if span is None:
            return (self.noise * clean.float().std() * noise).to(clean.device)
        if self.corrupt_at == "connector":
            raise ValueError("a corruption span needs encoder frames: corrupt_at=audio_conv or audio_input")
        time_axis = -1 if self.corrupt_at == "audio_conv" else 1  # conv: [batch, channels, frames]
        frames = self.span_frames(span, clean.shape[time_axis])
        index = torch.tensor(list(frames), device=clean.device)
        mask = torch.zeros(clean.shape[time_axis], dtype=torch.bool)
        mask[list(frames)] = True
        shape = [1] * clean.dim()
        shape[time_axis] = -1
        scale = self.noise * clean.index_select(time_axis, index).float().std().cpu()
        return (scale * noise * mask.view(shape)).to(clean.device)

    def trace(
        self,
        prompt: Prompt,
        answer: str,
        span: tuple[float, float] | None = None,
        words: Mapping[str, tuple[float, float]] | None = None,
    ) -> SampleTrace | None:
        """Trace one sample; None when the model does not answer it right. A sample whose
        answer the noise hardly moves (p drops by less than `min_drop`) is returned without
        restored runs: there is no effect to locate. `span`: corrupt only the frames of that
        time range of the clip (seconds); `words`: group positions by these words (see above)."""
        lalm = self.lalm
        with_answer = lalm.to_device(lalm.encode([prompt], [answer]))
        with torch.no_grad():
            known = bool(greedy_hits(lalm.logits(with_answer), with_answer["labels"])[0])
        if self.known_only and not known:
            return None
        first_answer = with_answer["labels"][0][with_answer["labels"][0] != IGNORE_INDEX][0]
        batch = lalm.to_device(lalm.encode([prompt]))
        probs, self._clean, record = self._run(batch, None)
        noise = self.noise_for(record["clean"], span)
        p_corrupt = float(self._run(batch, noise)[0][0, first_answer])
        result = SampleTrace(float(probs[0, first_answer]), p_corrupt)
        if result.p_clean - p_corrupt < self.min_drop:
            return result

        jobs: list[tuple[TracedSite, set[str], int, str]] = []
        rate = prompt.sampling_rate or lalm.sampling_rate
        seconds = len(prompt.audio) / rate if prompt.audio is not None else 0.0
        positions = self.positions(batch, self._clean, words, seconds)
        for tower, places in positions.items():
            count = max(s.layer for s in self.sites if s.tower == tower) + 1
            spans = windows(count, self.window)
            here = [s for s in self.sites if s.tower == tower]
            for site in here:
                span = spans[site.layer]
                paths = {s.path for s in here if s.component == site.component and s.layer in span}
                jobs += [(site, paths, pos, group) for pos, group in places]
        for chunk in range(0, len(jobs), self.batch_size):
            part = jobs[chunk : chunk + self.batch_size]
            rows = {k: v.repeat(len(part), *[1] * (v.dim() - 1)) for k, v in batch.items()}
            probs = self._run(rows, noise, [(paths, pos) for _, paths, pos, _ in part])[0][:, first_answer]
            for (site, _, _, group), p in zip(part, probs.tolist(), strict=True):
                result.effects[(site.tower, site.component, site.layer, group)].append(p - p_corrupt)
        self._clean = {}
        return result


@dataclass
class TraceSummary:
    """Indirect effects averaged over samples."""

    rows: list[dict]  # tower, component, layer, group, ie, n
    samples: int
    skipped: int  # samples the model got wrong
    robust: int  # samples the noise did not move by min_drop
    p_clean: float
    p_corrupted: float

    def per_layer(self) -> list[dict]:
        """Per tower, component and layer: the mean IE over the audio positions (rows or frames),
        at the last token (LLM), and the largest group mean."""
        out = []
        key = lambda r: (r["tower"], r["component"], r["layer"])  # noqa: E731
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.rows:
            groups[key(r)].append(r)
        for (tower, component, layer), rows in groups.items():
            audio = [r["ie"] for r in rows if r["group"].startswith(("audio", "frames"))]
            last = [r["ie"] for r in rows if r["group"] == "last"]
            out.append({"tower": tower, "component": component, "layer": layer,
                        "ie_audio": float(np.mean(audio)) if audio else None,
                        "ie_last": last[0] if last else None,
                        "ie_max": max(r["ie"] for r in rows)})  # fmt: skip
        return out


def summarise(traces: Iterable[SampleTrace | None]) -> TraceSummary:
    kept = list(traces)
    right = [t for t in kept if t is not None]
    done = [t for t in right if t.effects]
    if not done:
        raise RuntimeError(
            f"causal tracing: of {len(kept)} samples the model answered {len(right)} right, and the "
            "noise moved none of them by min_drop; nothing to trace. Raise `noise` or trace more samples"
        )
    pooled: dict[tuple, list[float]] = defaultdict(list)
    for t in done:
        for k, effects in t.effects.items():
            pooled[k].append(float(np.mean(effects)))  # each sample weighs the same in a group
    rows = [
        {"tower": k[0], "component": k[1], "layer": k[2], "group": k[3], "ie": float(np.mean(v)), "n": len(v)}
        for k, v in sorted(pooled.items(), key=lambda kv: (kv[0][0] != "audio", kv[0][1], kv[0][2], kv[0][3]))
    ]
    return TraceSummary(
        rows, len(done), len(kept) - len(right), len(right) - len(done),
        float(np.mean([t.p_clean for t in done])), float(np.mean([t.p_corrupted for t in done])),
    )  # fmt: skip


def group_order(groups: Iterable[str]) -> list[str]:
    """prefix, audio1.., frames1.., question, the anchor words (spoken facts), last."""
    rank = {"prefix": 0, "question": 3, "last": 4, **{a: 3 + (i + 1) / 10 for i, a in enumerate(ANCHORS)}}
    return sorted(set(groups), key=lambda g: (rank.get(g, 1 if g.startswith("audio") else 2), len(g), g))


def heatmaps(summary: TraceSummary, out_dir: Path) -> list[Path]:
    """One PNG per tower: a heatmap of the mean IE (layer x position group) per component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for tower in ("audio", "llm"):
        rows = [r for r in summary.rows if r["tower"] == tower]
        if not rows:
            continue
        groups = group_order(r["group"] for r in rows)
        layers = sorted({r["layer"] for r in rows})
        fig, axes = plt.subplots(1, len(COMPONENTS), figsize=(4 * len(COMPONENTS), 1 + 0.5 * len(layers)))
        vmax = max(abs(r["ie"]) for r in rows) or 1.0
        for ax, component in zip(axes, COMPONENTS, strict=True):
            grid = np.full((len(layers), len(groups)), np.nan)
            for r in rows:
                if r["component"] == component:
                    grid[layers.index(r["layer"]), groups.index(r["group"])] = r["ie"]
            image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower")
            ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), layers)
            ax.set_title(f"{tower} {component}")
            ax.set_xlabel("position")
            ax.set_ylabel("layer")
        fig.colorbar(image, ax=axes, label="indirect effect")
        title = f"p(answer): clean {summary.p_clean:.3f}, corrupted {summary.p_corrupted:.3f}"
        fig.suptitle(f"{title}, {summary.samples} samples", y=1.04)
        path = out_dir / f"trace_{tower}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def run(lalm: LALM, data, out_dir: Path, *, samples: int, **settings) -> TraceSummary:
    """Trace the first `samples` test instances of each attribute (spoken facts: of each relation,
    the noise over the subject's frames, positions grouped by the anchor words); write CSVs,
    heatmaps, summary."""
    tracer = CausalTracer(lalm, **settings)
    if isinstance(data, SpokenFactsData):
        items = fact_samples(data, lalm.sampling_rate, samples)
    else:
        items = reliability_samples(data.eval_instances(), data.audio_root, lalm.sampling_rate, samples)
    traces = []
    with progress_bar("causal tracing", len(items), unit="samples") as advance:
        for item in items:
            where = {"span": item.span, "words": item.words} if isinstance(item, FactSample) else {}
            traces.append(tracer.trace(item.prompt, item.truth, **where))
            advance(1)
    summary = summarise(traces)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "trace.csv", summary.rows)
    write_csv(out_dir / "trace_per_layer.csv", summary.per_layer())
    info = {"samples": summary.samples, "skipped_wrong": summary.skipped, "skipped_robust": summary.robust,
            "p_clean": summary.p_clean,
            "p_corrupted": summary.p_corrupted, "settings": settings}  # fmt: skip
    (out_dir / "trace.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    plots = heatmaps(summary, out_dir)
    log.info("traced %d samples (skipped: %d answered wrong, %d not moved by the noise): p clean %.3f, "
             "corrupted %.3f; %s", summary.samples, summary.skipped, summary.robust, summary.p_clean,
             summary.p_corrupted,
             ", ".join(str(p) for p in [out_dir / "trace_per_layer.csv", *plots]))  # fmt: skip
    return summary


def traced_layer(folder: str, tower: str = "llm", component: str = "mlp") -> int:
    """The layer with the largest indirect effect in a tracing run's trace_per_layer.csv: at the
    last token for the LLM, over the frames for the audio encoder. A config resolver:
    editor.layer='${traced_layer:outputs/analyze/trace-tiny-sake_mini,llm,mlp}'."""
    path = Path(folder) / "trace_per_layer.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tracing output; run python trace.py first")
    column = "ie_last" if tower == "llm" else "ie_audio"
    with open(path, encoding="utf-8") as f:
        rows = [
            r for r in csv.DictReader(f) if r["tower"] == tower and r["component"] == component and r[column]
        ]
    if not rows:
        raise ValueError(f"{path}: no {tower} {component} rows with {column}")
    return int(max(rows, key=lambda r: float(r[column]))["layer"])

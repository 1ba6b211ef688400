"""What the locate-then-edit editors (ROME, AlphaEdit) share: the keys of a linear layer, their
second moment over a generic corpus (cached on disk per model and layer), and the search for a
target value at a module's output (UnKE's stage 1 is the same search).

Keys are a linear layer's inputs. Where they are read (`position`):
- `last`: the last prompt position (the one that predicts the answer);
- `last_audio`: the last audio row of the LLM input;
- `audio`: the mean over the audio rows (LLM) or over all frames (an audio-encoder layer, whose
  positions are frames: the relevant span is the clip);
- `span`: the mean over the audio rows (LLM) or the encoder frames that overlap the request's
  time span (a spoken fact's subject word: EditRequest.span; lalms/spans.py maps seconds to
  positions), as the spoken-facts study reads its keys.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from common import EditRequest, TrainPool
from common.prompt import Prompt
from lalms.base import IGNORE_INDEX, LALM, answer_nll, greedy_hits, hidden, with_hidden
from lalms.hooks import Trace, hooked
from lalms.spans import frame_seconds, span_frames, span_rows

log = logging.getLogger(__name__)
POSITIONS = ("last", "last_audio", "audio", "span")


SCALES = ("layer", "positions", "lookup")
DECAYS = ("squared", "linear")
KL_DIRECTIONS = ("before_after", "after_before")


@dataclass(frozen=True)
class ValueSearch:
    """The search for a target value at a module's output (`search_delta`). The defaults of the
    configs (scale layer, decay squared, kl before_after, early_stop_loss None) are this
    project's forms; `lookup`, `linear`, `after_before` and early_stop_loss 0.05 are those of
    ROME's and AlphaEdit's reference code (configs/editor/{rome,alphaedit}_reference.yaml)."""

    lr: float  # Adam on the additive delta
    steps: int  # Adam updates (at most)
    kl_weight: float  # on the KL term at a neutral question about the clip
    weight_decay: float  # on the decay term (`decay`)
    clamp_norm: float  # |delta| <= clamp_norm * s
    scale: str  # s: layer | positions | lookup (search_delta)
    decay: str  # squared: (|delta| / s)^2 | linear: |delta| / s^2
    kl: str  # before_after: KL(before || after) | after_before: KL(after || before)
    early_stop_loss: float | None  # stop (before the update) once the loss is below this; None: never

    def __post_init__(self) -> None:
        for name, allowed in (("scale", SCALES), ("decay", DECAYS), ("kl", KL_DIRECTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ValueSearch.{name} is one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class KeyCorpus:
    """The train split's questions whose keys give a layer's second moment (`second_moment`)."""

    text: int
    audio: int
    cache_dir: str | None  # the moments on disk, per model, layer and corpus; None: not cached


@dataclass(frozen=True)
class ClipSpan:
    """A time span of a prompt's clip: (start, end) and the clip's duration, in seconds."""

    start: float
    end: float
    seconds: float

    @classmethod
    def of(cls, request: EditRequest, sampling_rate: int) -> ClipSpan | None:
        """The request's span (None if it has none), with its clip's duration."""
        if request.span is None:
            return None
        audio = request.prompt.audio
        if audio is None:
            raise ValueError("an edit request with a time span needs a prompt with audio")
        return cls(*request.span, len(audio) / (request.prompt.sampling_rate or sampling_rate))


def key_positions(
    lalm: LALM,
    batch: dict[str, torch.Tensor],
    tower: str,
    position: str,
    frames: int,
    span: ClipSpan | None = None,
) -> torch.Tensor:
    """(B, T) float weights of the positions a key averages over, per row (rows sum to 1);
    `span`: the request's time span, which position `span` reads."""
    ids = batch["input_ids"]
    if position == "span" and span is None:
        raise ValueError("key position 'span' needs an edit request with a time span (EditRequest.span)")
    if tower == "audio":
        if position != "span":
            return torch.full((ids.shape[0], frames), 1.0 / frames)
        weights = torch.zeros(ids.shape[0], frames)
        where = span_frames((span.start, span.end), frames, frame_seconds(lalm))
        weights[:, where] = 1.0 / len(where)
        return weights
    audio = ids == lalm.audio_token_id
    weights = torch.zeros(ids.shape, dtype=torch.float)
    labels = batch.get("labels")
    for b in range(ids.shape[0]):
        rows = audio[b].nonzero().flatten()
        if position == "last" or not len(rows):
            if position != "last":
                raise ValueError(f"key position {position!r} needs an audio prompt; row {b} has no audio")
            answer = (labels[b] != IGNORE_INDEX).nonzero().flatten() if labels is not None else []
            weights[b, int(answer[0]) - 1 if len(answer) else -1] = 1.0  # the last prompt position
        elif position == "last_audio":
            weights[b, rows[-1]] = 1.0
        elif position == "span":
            where = span_rows((span.start, span.end), rows.tolist(), span.seconds)
            weights[b, where] = 1.0 / len(where)
        else:
            weights[b, rows] = 1.0 / len(rows)
    return weights


class LinearSite:
    """One edited linear layer: its module, tower and the keys/values at its positions."""

    def __init__(self, lalm: LALM, name: str, position: str = "last") -> None:
        if position not in POSITIONS:
            raise ValueError(f"key position must be one of {POSITIONS}, got {position!r}")
        self.lalm, self.name, self.position = lalm, name, position
        self.path = lalm.edit_sites.resolve(name)
        self.module = lalm.model.get_submodule(self.path)
        if not isinstance(self.module, torch.nn.Linear):
            raise ValueError(
                f"edit site {name!r} ({self.path}) is a {type(self.module).__name__}, not a Linear layer"
            )
        self.tower = "audio" if name.startswith("audio.") else "llm"
        self.param = f"{self.path}.weight"

    def keys_and_outputs(
        self, batch: dict[str, torch.Tensor], span: ClipSpan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-row keys (B, d_in), per-row outputs (B, d_out), position weights (B, T));
        `span`: the request's time span (position `span`)."""
        with Trace(self.module) as t, torch.no_grad():
            self.lalm.logits(batch)
        x, y = t.input, t.output
        if self.tower == "audio":  # encoder inputs are per clip: one clip per prompt here
            x, y = x[: batch["input_ids"].shape[0]], y[: batch["input_ids"].shape[0]]
        w = key_positions(self.lalm, batch, self.tower, self.position, x.shape[1], span)
        w = w.to(x.device, x.dtype)
        return torch.einsum("bt,btd->bd", w, x), torch.einsum("bt,btd->bd", w, y), w


def corpus_digest(prompts: Sequence[Prompt]) -> str:
    """A digest of a corpus's questions and audio samples: what a cached moment was computed on."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.question.encode())
        h.update(b"\0" if p.audio is None else p.audio.tobytes())
    return h.hexdigest()


def second_moment(
    lalm: LALM, site: LinearSite, pool: TrainPool, corpus: KeyCorpus, batch_size: int = 16
) -> torch.Tensor:
    """E[k k^T] of the site's inputs over the train split's questions (every real position or
    frame), cached in `corpus.cache_dir` by model fingerprint, site and the corpus itself."""
    prompts = pool.preservation(corpus.text, corpus.audio)
    key = f"{lalm.fingerprint()}:{site.path}:{corpus_digest(prompts)}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(corpus.cache_dir) / f"second_moment-{tag}.pt" if corpus.cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, map_location=lalm.device, weights_only=True)
    total, count = None, 0

    def hook(m, args, out):
        nonlocal total, count
        x = args[0].detach().float()
        mask = seen_mask[0]
        if site.tower == "llm" and mask is not None and mask.shape == x.shape[:2]:
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1])
        total = x.T @ x if total is None else total + x.T @ x
        count += x.shape[0]

    seen_mask: list = [None]
    with hooked(site.module, hook), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = lalm.to_device(lalm.encode(prompts[start : start + batch_size]))
            seen_mask[0] = batch["attention_mask"]
            lalm.logits(batch)
    moment = total / max(count, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(moment.cpu(), tmp)
        tmp.replace(path)
        log.info("cached the key second moment of %s (%d keys) at %s", site.path, count, path)
    return moment


@dataclass
class SearchTrace:
    """A delta search's trace: the first step at which the delta made greedy decoding produce
    the labels (None: never), and |delta| / scale then (`train.py editor=unke` calibrates on
    them), and the loss at each step (before that step's update)."""

    solved_at: int | None = None
    norm: float | None = None
    losses: list[float] = field(default_factory=list)


def search_scale(h: torch.Tensor, where: torch.Tensor, scale: str) -> torch.Tensor:
    """The scale s of the unedited output `h` ((B, T, D)) for a search that adds its delta where
    `where` ((B, T) weights) > 0: the norm of
    - `layer`: h, averaged over all positions (ROME, AlphaEdit here: at the last position alone an
      MLP output can be near zero, which would forbid any edit);
    - `positions`: h, averaged over the edited positions (UnKE: the state it moves);
    - `lookup`: h at the first row's key position (the `where`-weighted mean of row 0's states:
      the position itself for keys at one position), the references' |h_init| (kmeng01/rome
      rome/compute_v.py:84 and :161; AlphaEdit AlphaEdit/compute_z.py:100 and :186)."""
    h = h.detach().float()
    where = where.to(h.device)
    if scale == "layer":
        return h.norm(dim=-1).mean()
    if scale == "positions":
        return h.norm(dim=-1)[where > 0].mean()
    if scale == "lookup":
        return torch.einsum("t,td->d", where[0].float(), h[0]).norm()
    raise ValueError(f"search scale is one of {SCALES}, got {scale!r}")


def decay_term(delta: torch.Tensor, s: torch.Tensor, decay: str) -> torch.Tensor:
    """The weight-decay term before its weight: `squared` (|delta| / s)^2 (here), `linear`
    |delta| / s^2 (the references': rome/compute_v.py:140-142, AlphaEdit/compute_z.py:165-167)."""
    if decay == "squared":
        return (delta.norm() / s) ** 2
    if decay == "linear":
        return delta.norm() / s**2
    raise ValueError(f"search decay is one of {DECAYS}, got {decay!r}")


def kl_term(before: torch.Tensor, after: torch.Tensor, direction: str) -> torch.Tensor:
    """KL between the neutral prompts' next-token log-distributions before and after the delta
    (rows: prompts; the batch mean of the per-row sums): `before_after` KL(before || after)
    (here), `after_before` KL(after || before) (the references': F.kl_div(init, current) at
    rome/compute_v.py:137-139, AlphaEdit/compute_z.py:162-164)."""
    if direction == "before_after":
        return F.kl_div(after, before, log_target=True, reduction="batchmean")
    if direction == "after_before":
        return F.kl_div(before, after, log_target=True, reduction="batchmean")
    raise ValueError(f"search kl is one of {KL_DIRECTIONS}, got {direction!r}")


def search_delta(
    lalm: LALM,
    module: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    where: torch.Tensor,
    neutral: dict[str, torch.Tensor] | None,
    neutral_where: torch.Tensor | None,
    search: ValueSearch,
    until_solved: bool = False,
) -> tuple[torch.Tensor, SearchTrace]:
    """(delta, trace): the additive delta at `module`'s output, added at each row's positions
    where `where` > 0 ((B, T)), that makes the model answer `batch`'s labels. Adam (search.lr,
    at most search.steps updates) on NLL + kl_weight * KL (`kl_term`, search.kl) of the
    next-token distribution at the last position of `neutral` (delta added where `neutral_where`
    > 0) + weight_decay * `decay_term` (search.decay), with |delta| clamped to clamp_norm * s
    after each update; s is the unedited output's scale (`search_scale`, search.scale). Both the
    decay and the clamp are relative to s, so the settings carry across layers and models of any
    scale. The search stops before an update once the loss is below search.early_stop_loss (if
    set; the references': rome/compute_v.py:150-151); `until_solved` stops at the first step
    whose delta makes greedy decoding give the labels."""
    delta: torch.Tensor | None = None
    scale: list[torch.Tensor] = []

    def add(w: torch.Tensor):
        def hook(m, args, out):
            nonlocal delta
            h = hidden(out)
            if delta is None:  # first call: size the delta and the scale from the unedited output
                delta = torch.zeros(h.shape[-1], device=h.device, dtype=torch.float, requires_grad=True)
                scale.append(search_scale(h, w, search.scale))
            return with_hidden(out, h + (w > 0).to(h.device, h.dtype)[..., None] * delta.to(h.dtype))

        return hook

    with hooked(module, add(where)), torch.no_grad():
        lalm.logits(batch)  # sizes the delta
    before = None
    if neutral is not None:
        with torch.no_grad():
            before = lalm.logits(neutral)[:, -1].float().log_softmax(-1)
    optimizer = torch.optim.Adam([delta], lr=search.lr)
    limit = search.clamp_norm * scale[0]
    trace = SearchTrace()
    with torch.enable_grad():
        for step in range(search.steps):
            with hooked(module, add(where)):
                logits = lalm.logits(batch)
            if trace.solved_at is None and bool(greedy_hits(logits, batch["labels"]).all()):
                trace.solved_at, trace.norm = step, float(delta.detach().norm() / scale[0])
                if until_solved:
                    break
            decay = search.weight_decay * decay_term(delta, scale[0], search.decay)
            loss = answer_nll(logits, batch["labels"]) + decay
            if neutral is not None:
                with hooked(module, add(neutral_where)):
                    after = lalm.logits(neutral)[:, -1].float().log_softmax(-1)
                loss = loss + search.kl_weight * kl_term(before, after, search.kl)
            trace.losses.append(float(loss.detach()))
            if search.early_stop_loss is not None and trace.losses[-1] < search.early_stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return delta.detach(), trace


def edit_batches(
    lalm: LALM, request: EditRequest, prefixes: Sequence[str], neutral_question: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(the context variants answered with the target, the neutral question about the clip or
    None): the edit question after each of `prefixes` (ROME's context variants), encoded."""
    contexts = [replace(request.prompt, question=f"{p}{request.prompt.question}") for p in prefixes]
    batch = lalm.to_device(lalm.encode(contexts, [request.target] * len(contexts)))
    neutral = None
    if neutral_question:
        neutral = lalm.to_device(lalm.encode([Prompt(neutral_question, audio=request.prompt.audio)]))
    return batch, neutral

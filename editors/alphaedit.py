"""AlphaEdit for LALMs: null-space-projected updates of several LLM MLP down-projections, or of
several audio-encoder layers, or both (audio first: the cross-modal multi-layer edit of the
spoken-facts study, whose LLM stage is solved on the edited audio path).

1. The target: an additive delta on the output of the last edited layer's block (the residual
   stream) at the key position, found as in ROME (NLL on the target, KL on a neutral question
   about the clip, weight decay, norm clamp): z = h_L + delta.
2. For each edited layer l in order (each on the model with the lower layers already updated):
   K1 = the layer's keys (down-projection inputs at the key position, one per context variant),
   R = (z - h_L now) / (layers left), one column per variant; the update X (d_in x d_out) solves
       (P (K1 K1^T + C_prev) + lambda I) X = P K1 R^T,    W += X^T,
   where P projects onto the null space of the preserved keys' second moment (the eigenvectors
   whose eigenvalue is below `null_threshold` times the largest, `null_space: relative`, or
   below `null_threshold` itself, `null_space: absolute`, the reference's; from the train
   split's questions, editors/locate.py), so the update leaves the preserved keys' outputs
   unchanged, and C_prev accumulates K1 K1^T of the edits applied before (sequential editing).
configs/editor/alphaedit_reference.yaml selects the reference's forms (jianghoucheng/AlphaEdit).
Each stage (the audio encoder's `audio_layers`, then the LLM's `layers`) has its own target at
its last edited layer's output and solves its layers as above. The updates are written in place
behind a `WeightSnapshot`; undo also restores C_prev.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common import EditRequest, TrainPool
from editors.base import BatchEdit, WeightSnapshot
from editors.locate import (
    ClipSpan,
    KeyCorpus,
    LinearSite,
    ValueSearch,
    edit_batches,
    search_delta,
    second_moment,
)
from lalms.base import LALM
from lalms.hooks import Trace
from lalms.rows import RowEdits, RowsMemory, low_rank_memory


@dataclass(frozen=True)
class AlphaEditHParams:
    layers: tuple[int, ...]  # LLM layers whose MLP down-projections are edited
    audio_layers: tuple[int, ...]  # audio-encoder layers edited first (their `audio_module`)
    audio_module: str  # the linear layer edited in an audio-encoder layer (Whisper's: fc2)
    position: str  # where keys are read: last | last_audio | audio | span (editors/locate.py)
    prefixes: tuple[str, ...]  # context variants: the edit question after each
    neutral_question: str | None  # KL on this question about the clip; None: no KL term
    corpus: KeyCorpus  # the preserved keys' questions
    search: ValueSearch  # the target's search at the last edited block's output
    null_space: str  # relative: eigenvalues below null_threshold times the largest span the null
    # space | absolute: eigenvalues below null_threshold (the reference's: experiments/evaluate.py:418-422)
    null_threshold: float
    ridge: float  # lambda


NULL_SPACES = ("relative", "absolute")


def null_directions(values: torch.Tensor, null_space: str, threshold: float) -> torch.Tensor:
    """Which eigenvalues (of a symmetric positive semi-definite moment, ascending as from eigh)
    span the null space: `relative` below threshold times the largest, `absolute` below the
    threshold itself. The reference thresholds the singular values of the moment's SVD (its
    eigenvalues' magnitudes: AlphaEdit experiments/evaluate.py:418-420), hence |values| there."""
    if null_space == "relative":
        return values < threshold * values.max()
    if null_space == "absolute":
        return values.abs() < threshold
    raise ValueError(f"AlphaEdit null_space is one of {NULL_SPACES}, got {null_space!r}")


@dataclass(frozen=True)
class Stage:
    """The layers of one tower edited together, and the block whose output holds their target."""

    sites: list[LinearSite]
    block: torch.nn.Module


class AlphaEdit:
    HParams = AlphaEditHParams

    def __init__(self, lalm: LALM, hp: AlphaEditHParams, pool: TrainPool) -> None:
        if not hp.layers and not hp.audio_layers:
            raise ValueError("AlphaEdit needs at least one layer (layers or audio_layers)")
        if hp.null_space not in NULL_SPACES:
            raise ValueError(f"AlphaEdit null_space is one of {NULL_SPACES}, got {hp.null_space!r}")
        self.lalm, self.hp, self.pool = lalm, hp, pool
        sites = lalm.edit_sites
        towers = (
            ("audio", hp.audio_layers, sites.num_audio_layers, hp.audio_module),
            ("llm", hp.layers, sites.num_llm_layers, "mlp.down_proj"),
        )
        self.stages = []
        for tower, layers, count, module in towers:
            if not layers:
                continue
            if not count:
                raise ValueError(f"AlphaEdit: this model has no {tower} layers to edit")
            chosen = sorted(int(layer) % count for layer in layers)
            self.stages.append(
                Stage(
                    [LinearSite(lalm, f"{tower}.layers.{i}.{module}", hp.position) for i in chosen],
                    lalm.model.get_submodule(sites.resolve(f"{tower}.layers.{chosen[-1]}")),
                )
            )
        self.sites = [site for stage in self.stages for site in stage.sites]
        self._projections: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}  # C_prev per site: sum of the applied edits' K1 K1^T

    def projection(self, site: LinearSite) -> torch.Tensor:
        """P onto the null space of the preserved keys' second moment, computed once per site on
        the unedited model (`apply` computes every site's before its first update)."""
        if site.path not in self._projections:
            moment = second_moment(self.lalm, site, self.pool, self.hp.corpus).float()
            values, vectors = torch.linalg.eigh(moment)
            null = vectors[:, null_directions(values, self.hp.null_space, self.hp.null_threshold)]
            self._projections[site.path] = null @ null.T
        return self._projections[site.path]

    def _residual_at(self, block: torch.nn.Module, batch, weights) -> torch.Tensor:
        """A stage's last edited block's output at each row's key positions (rows: variants)."""
        with Trace(block) as t, torch.no_grad():
            self.lalm.logits(batch)
        out = t.output[: weights.shape[0]]  # an encoder block's rows are clips: one per prompt
        return torch.einsum("bt,btd->bd", weights.to(out.dtype), out).float()

    def target(
        self, request: EditRequest, stage: Stage
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(the edit batch, its key-position weights, the target residual z = h_L + delta) of
        a stage for `request`, on the model as it is now."""
        lalm = self.lalm
        batch, neutral = edit_batches(lalm, request, self.hp.prefixes, self.hp.neutral_question)
        span = ClipSpan.of(request, lalm.sampling_rate)
        _, _, weights = stage.sites[-1].keys_and_outputs(batch, span)
        neutral_weights = stage.sites[-1].keys_and_outputs(neutral, span)[2] if neutral is not None else None
        delta, _ = search_delta(lalm, stage.block, batch, weights, neutral, neutral_weights, self.hp.search)
        return batch, weights, self._residual_at(stage.block, batch, weights) + delta

    def solve(
        self,
        request: EditRequest,
        previous: dict[str, torch.Tensor],
        write: Callable[[LinearSite, torch.Tensor, torch.Tensor, torch.Tensor], None],
    ) -> None:
        """Each stage's target, then its layers' updates in order, each on the model with the
        earlier stages' and lower layers' updates written by `write(site, A, P K1, R)` (the
        update X solves A X = P K1 R^T); `previous` (C_prev per site) gains each layer's K1 K1^T."""
        span = ClipSpan.of(request, self.lalm.sampling_rate)
        for stage in self.stages:
            batch, weights, target = self.target(request, stage)
            for i, site in enumerate(stage.sites):
                keys, _, _ = site.keys_and_outputs(batch, span)
                k1 = keys.float().T  # (d_in, variants)
                now = self._residual_at(stage.block, batch, weights)
                r = ((target - now) / (len(stage.sites) - i)).T  # (d_out, variants)
                p = self.projection(site)
                c_prev = previous.get(site.path, torch.zeros_like(p))
                a = p @ (k1 @ k1.T + c_prev) + self.hp.ridge * torch.eye(len(p), device=p.device)
                write(site, a, p @ k1, r)
                previous[site.path] = c_prev + k1 @ k1.T

    def apply(self, request: EditRequest) -> AlphaEditHandle:
        for site in self.sites:  # every null space on the unedited model, before any update
            self.projection(site)
        snapshot = WeightSnapshot(self.lalm.model, [s.param for s in self.sites])
        before = {k: v.clone() for k, v in self.previous.items()}

        def write(site: LinearSite, a: torch.Tensor, pk1: torch.Tensor, r: torch.Tensor) -> None:
            x = torch.linalg.solve(a, pk1 @ r.T)  # (d_in, d_out)
            with torch.no_grad():
                site.module.weight.add_(x.T.to(site.module.weight.dtype))

        try:
            self.solve(request, self.previous, write)
        except BaseException:
            snapshot.undo()
            self.previous = before
            raise
        return AlphaEditHandle(self, snapshot, before)

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once (editors/base.py), each seen by its own rows; each edit
        solved on the model as its group's earlier edits left it (with the group's own C_prev),
        its updates kept factored: dW = X^T = R (A^-1 P K1)^T, of rank the number of variants."""
        for site in self.sites:
            self.projection(site)
        previous = [{k: v.clone() for k, v in self.previous.items()} for _ in requests]

        def add(edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
            for g, request in pairs:

                def write(site: LinearSite, a: torch.Tensor, pk1: torch.Tensor, r: torch.Tensor) -> None:
                    edits.push(site.path, g, r.T, torch.linalg.solve(a, pk1).T)  # noqa: B023

                with edits.only(g):
                    self.solve(request, previous[g], write)

        batch = BatchEdit(self.lalm, len(requests), add)
        batch.add(requests)
        return batch

    def rows_memory(self, tokens: int) -> RowsMemory:
        """An edit's factors: of rank the number of context variants per layer."""
        shapes = [tuple(site.module.weight.shape) for site in self.sites]
        return low_rank_memory(shapes, max(len(self.hp.prefixes), 1), self.lalm.model.dtype)


class AlphaEditHandle:
    """Undo writes the layers back bitwise and restores the accumulated keys C_prev."""

    def __init__(
        self, editor: AlphaEdit, snapshot: WeightSnapshot, previous: dict[str, torch.Tensor]
    ) -> None:
        self.editor, self.snapshot, self.previous = editor, snapshot, previous

    def undo(self) -> None:
        self.snapshot.undo()  # raises if already undone
        self.editor.previous = self.previous

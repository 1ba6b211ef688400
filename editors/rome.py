"""ROME for LALMs: a rank-one update of one linear layer, on an LLM MLP or on the audio encoder.

For each site in `sites` (in order; with an audio site first and an LLM site second, the LLM
edit is computed on the already edited audio path: the cross-modal sequential variant):
1. the key k* is the mean over the context variants (the edit question after each of
   `prefixes`) of the layer's input at the key position (`position`, editors/locate.py; an
   audio-encoder layer's keys are mean-pooled over the clip's frames);
2. the target value is found by optimising an additive delta at the layer's output over those
   positions so that the model answers the target (NLL), with KL on a neutral question about the
   same clip (`neutral_question`), weight decay and a norm clamp: v* = W k* + b + delta;
3. dW = (v* - W k* - b) (C^-1 k*)^T / (k*^T C^-1 k*), C = E[k k^T] of the layer's inputs over
   the train split's questions (editors/locate.py; cached on disk per model and layer).
configs/editor/rome_reference.yaml selects the reference's forms (kmeng01/rome) where they differ.
The update is written in place behind a `WeightSnapshot`, so undo is bitwise and sequential
edits accumulate.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from lalms.rows import RowEdits, RowsMemory, low_rank_memory


@dataclass(frozen=True)
class ROMEHParams:
    sites: tuple[str, ...]  # linear layers, edited in this order (llm.layers.<i>.mlp.down_proj, audio...)
    position: str  # where keys are read: last | last_audio | audio | span (editors/locate.py)
    prefixes: tuple[str, ...]  # context variants: the edit question after each
    neutral_question: str | None  # KL on this question about the clip; None: no KL term
    corpus: KeyCorpus  # the second moment C's questions
    search: ValueSearch  # the target value's search
    regularisation: float  # added to C, times its mean diagonal; 0: the plain inverse C^-1 (the
    # reference's, kmeng01/rome rome/compute_u.py:51-53)


class ROME:
    HParams = ROMEHParams

    def __init__(self, lalm: LALM, hp: ROMEHParams, pool: TrainPool) -> None:
        if not hp.sites:
            raise ValueError("ROME needs at least one edit site")
        self.lalm, self.hp, self.pool = lalm, hp, pool
        self.sites = [LinearSite(lalm, s, hp.position) for s in hp.sites]
        self._inverse: dict[str, torch.Tensor] = {}

    def inverse_moment(self, site: LinearSite) -> torch.Tensor:
        """C^-1 (with `regularisation` times its mean diagonal added; with 0, C's own inverse),
        computed once per site, on the unedited model (`apply` computes every site's before its
        first edit)."""
        if site.path not in self._inverse:
            c = second_moment(self.lalm, site, self.pool, self.hp.corpus).float()
            c = c + self.hp.regularisation * c.diagonal().mean() * torch.eye(len(c), device=c.device)
            self._inverse[site.path] = torch.linalg.inv(c)
        return self._inverse[site.path]

    def update(self, site: LinearSite, request: EditRequest) -> torch.Tensor:
        """The rank-one dW of `site` for `request`, computed on the model as it is now."""
        delta, ck, denominator = self.rank_one(site, request)
        return torch.outer(delta, ck) / denominator

    def rank_one(
        self, site: LinearSite, request: EditRequest
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dW = delta (C^-1 k*)^T / (k*^T C^-1 k*) as (delta, C^-1 k*, k*^T C^-1 k*)."""
        batch, neutral = edit_batches(self.lalm, request, self.hp.prefixes, self.hp.neutral_question)
        span = ClipSpan.of(request, self.lalm.sampling_rate)
        keys, _, weights = site.keys_and_outputs(batch, span)
        neutral_weights = site.keys_and_outputs(neutral, span)[2] if neutral is not None else None
        delta, _ = search_delta(
            self.lalm, site.module, batch, weights, neutral, neutral_weights, self.hp.search
        )
        k = keys.float().mean(0)
        ck = self.inverse_moment(site) @ k
        return delta, ck, k @ ck

    def apply(self, request: EditRequest) -> WeightSnapshot:
        for site in self.sites:  # every C on the unedited model, before this edit changes a site
            self.inverse_moment(site)
        snapshot = WeightSnapshot(self.lalm.model, [s.param for s in self.sites])
        try:
            for site in self.sites:  # each on the model with the earlier sites' updates in place
                dw = self.update(site, request)
                with torch.no_grad():
                    site.module.weight.add_(dw.to(site.module.weight.dtype))
        except BaseException:
            snapshot.undo()  # a failed edit leaves the model as it was
            raise
        return snapshot

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once (editors/base.py), each seen by its own rows; each edit's
        rank-one updates computed on the model as its group's earlier edits (and its own earlier
        sites) left it, and kept factored."""
        for site in self.sites:
            self.inverse_moment(site)

        def add(edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
            for g, request in pairs:
                with edits.only(g):
                    for site in self.sites:
                        delta, ck, denominator = self.rank_one(site, request)
                        edits.push(site.path, g, (delta / denominator)[None], ck[None])

        batch = BatchEdit(self.lalm, len(requests), add)
        batch.add(requests)
        return batch

    def rows_memory(self, tokens: int) -> RowsMemory:
        """An edit's factors: rank one per site."""
        shapes = [tuple(site.module.weight.shape) for site in self.sites]
        return low_rank_memory(shapes, 1, self.lalm.model.dtype)

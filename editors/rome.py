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
The update is written in place behind a `WeightSnapshot`, so undo is bitwise and sequential
edits accumulate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editors.base import EditRequest, WeightSnapshot
from editors.locate import Site, edit_batches, search_delta, second_moment
from lalms.base import LALM


class ROME:
    def __init__(
        self,
        lalm: LALM,
        sites: Sequence[str],
        corpus_root: str,
        audio_root: str | None = None,
        position: str = "last",
        prefixes: Sequence[str] = ("", "Listen carefully. ", "Here is a recording. "),
        neutral_question: str = "Describe this audio.",
        corpus_text: int = 200,
        corpus_audio: int = 200,
        cache_dir: str | None = None,
        lr: float = 0.5,
        steps: int = 25,
        kl_weight: float = 0.0625,
        weight_decay: float = 1e-3,
        clamp_norm: float = 4.0,
        regularisation: float = 1e-4,
    ) -> None:
        if not sites:
            raise ValueError("ROME needs at least one edit site")
        self.lalm = lalm
        self.sites = [Site(lalm, s, position) for s in sites]
        self.prefixes, self.neutral_question = list(prefixes), neutral_question
        self.corpus = (corpus_root, audio_root, corpus_text, corpus_audio, cache_dir)
        self.search = dict(
            lr=lr, steps=steps, kl_weight=kl_weight, weight_decay=weight_decay, clamp_norm=clamp_norm
        )
        self.regularisation = regularisation
        self._inverse: dict[str, torch.Tensor] = {}
        lalm.model.requires_grad_(False)

    def inverse_moment(self, site: Site) -> torch.Tensor:
        """C^-1 (with `regularisation` times its mean diagonal added), computed once per site, on
        the unedited model (`apply` computes every site's before its first edit)."""
        if site.path not in self._inverse:
            root, audio_root, n_text, n_audio, cache = self.corpus
            c = second_moment(self.lalm, site, root, audio_root, n_text, n_audio, cache).float()
            c = c + self.regularisation * c.diagonal().mean() * torch.eye(len(c), device=c.device)
            self._inverse[site.path] = torch.linalg.inv(c)
        return self._inverse[site.path]

    def update(self, site: Site, request: EditRequest) -> torch.Tensor:
        """The rank-one dW of `site` for `request`, computed on the model as it is now."""
        batch, neutral = edit_batches(self.lalm, request, self.prefixes, self.neutral_question)
        keys, _, weights = site.keys_and_outputs(batch)
        neutral_weights = site.keys_and_outputs(neutral)[2] if neutral is not None else None
        delta, _ = search_delta(
            self.lalm, site.module, batch, weights, neutral, neutral_weights, **self.search
        )
        k = keys.float().mean(0)
        ck = self.inverse_moment(site) @ k
        return torch.outer(delta, ck) / (k @ ck)

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

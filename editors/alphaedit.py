"""AlphaEdit for LALMs: null-space-projected updates of several LLM MLP down-projections.

1. The target: an additive delta on the output of the last edited layer's block (the residual
   stream) at the key position, found as in ROME (NLL on the target, KL on a neutral question
   about the clip, weight decay, norm clamp): z = h_L + delta.
2. For each edited layer l in order (each on the model with the lower layers already updated):
   K1 = the layer's keys (down-projection inputs at the key position, one per context variant),
   R = (z - h_L now) / (layers left), one column per variant; the update X (d_in x d_out) solves
       (P (K1 K1^T + C_prev) + lambda I) X = P K1 R^T,    W += X^T,
   where P projects onto the null space of the preserved keys' second moment (the eigenvectors
   whose eigenvalue is below `null_threshold` times the largest; from the train split's
   questions, editors/locate.py), so the update leaves the preserved keys' outputs unchanged,
   and C_prev accumulates K1 K1^T of the edits applied before (sequential editing).
The updates are written in place behind a `WeightSnapshot`; undo also restores C_prev.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editors.base import EditRequest, WeightSnapshot
from editors.locate import Site, edit_batches, search_delta, second_moment
from lalms.base import LALM, hidden


class AlphaEdit:
    def __init__(
        self,
        lalm: LALM,
        layers: Sequence[int],
        corpus_root: str,
        audio_root: str | None = None,
        position: str = "last",
        prefixes: Sequence[str] = ("",),
        neutral_question: str = "Describe this audio.",
        corpus_text: int = 200,
        corpus_audio: int = 200,
        cache_dir: str | None = None,
        null_threshold: float = 1e-2,
        ridge: float = 1.0,
        lr: float = 0.5,
        steps: int = 25,
        kl_weight: float = 0.0625,
        weight_decay: float = 1e-3,
        clamp_norm: float = 4.0,
    ) -> None:
        if not layers:
            raise ValueError("AlphaEdit needs at least one layer")
        self.lalm = lalm
        count = lalm.edit_sites.num_llm_layers
        self.layers = sorted(int(layer) % count for layer in layers)
        self.sites = [Site(lalm, f"llm.layers.{layer}.mlp.down_proj", position) for layer in self.layers]
        self.block = lalm.model.get_submodule(lalm.edit_sites.resolve(f"llm.layers.{self.layers[-1]}"))
        self.prefixes, self.neutral_question = list(prefixes), neutral_question
        self.corpus = (corpus_root, audio_root, corpus_text, corpus_audio, cache_dir)
        self.null_threshold, self.ridge = null_threshold, ridge
        self.search = dict(
            lr=lr, steps=steps, kl_weight=kl_weight, weight_decay=weight_decay, clamp_norm=clamp_norm
        )
        self._projections: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}  # C_prev per site: sum of the applied edits' K1 K1^T
        lalm.model.requires_grad_(False)

    def projection(self, site: Site) -> torch.Tensor:
        """P onto the null space of the preserved keys' second moment, computed once per site on
        the unedited model (`apply` computes every site's before its first update)."""
        if site.path not in self._projections:
            root, audio_root, n_text, n_audio, cache = self.corpus
            moment = second_moment(self.lalm, site, root, audio_root, n_text, n_audio, cache).float()
            values, vectors = torch.linalg.eigh(moment)
            null = vectors[:, values < self.null_threshold * values.max()]
            self._projections[site.path] = null @ null.T
        return self._projections[site.path]

    def _residual_at(self, batch, weights) -> torch.Tensor:
        """The last edited block's output at each row's key position (rows: variants)."""
        seen = {}
        handle = self.block.register_forward_hook(lambda m, a, out: seen.update(h=hidden(out).detach()))
        try:
            with torch.no_grad():
                self.lalm.logits(batch)
        finally:
            handle.remove()
        return torch.einsum("bt,btd->bd", weights.to(seen["h"].dtype), seen["h"]).float()

    def apply(self, request: EditRequest) -> AlphaEditHandle:
        for site in self.sites:  # every null space on the unedited model, before any update
            self.projection(site)
        lalm = self.lalm
        batch, neutral = edit_batches(lalm, request, self.prefixes, self.neutral_question)
        _, _, weights = self.sites[-1].keys_and_outputs(batch)
        neutral_weights = self.sites[-1].keys_and_outputs(neutral)[2] if neutral is not None else None
        delta, _ = search_delta(lalm, self.block, batch, weights, neutral, neutral_weights, **self.search)
        target = self._residual_at(batch, weights) + delta
        snapshot = WeightSnapshot(lalm.model, [s.param for s in self.sites])
        before = {k: v.clone() for k, v in self.previous.items()}
        try:
            for i, site in enumerate(self.sites):
                keys, _, _ = site.keys_and_outputs(batch)
                k1 = keys.float().T  # (d_in, variants)
                r = (
                    (target - self._residual_at(batch, weights)) / (len(self.sites) - i)
                ).T  # (d_out, variants)
                p = self.projection(site)
                c_prev = self.previous.get(site.path, torch.zeros_like(p))
                a = p @ (k1 @ k1.T + c_prev) + self.ridge * torch.eye(len(p), device=p.device)
                x = torch.linalg.solve(a, p @ k1 @ r.T)  # (d_in, d_out)
                with torch.no_grad():
                    site.module.weight.add_(x.T.to(site.module.weight.dtype))
                self.previous[site.path] = c_prev + k1 @ k1.T
        except BaseException:
            snapshot.undo()
            self.previous = before
            raise
        return AlphaEditHandle(self, snapshot, before)


class AlphaEditHandle:
    """Undo writes the layers back bitwise and restores the accumulated keys C_prev."""

    def __init__(
        self, editor: AlphaEdit, snapshot: WeightSnapshot, previous: dict[str, torch.Tensor]
    ) -> None:
        self.editor, self.snapshot, self.previous = editor, snapshot, previous

    def undo(self) -> None:
        self.snapshot.undo()  # raises if already undone
        self.editor.previous = self.previous

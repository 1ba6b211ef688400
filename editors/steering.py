"""Optimal-transport activation steering: move the last layer's state from the original label's
distribution to the target's, for the inputs that look like the edit.

At apply, two Gaussians are fitted to the last decoder layer's output at the last prompt
position (before the final norm):
- source: the edit prompt and up to `samples` train-split questions about clips of the original
  label (same attribute);
- target: up to `samples` train-split questions about clips of the target label: inputs the
  model already perceives as the target, i.e. where the steering should land.
Covariances are shrunk towards their mean variance (`shrinkage`). The linear Monge map between
the Gaussians, A = Cs^-1/2 (Cs^1/2 Ct Cs^1/2)^1/2 Cs^-1/2, b = mu_t - A mu_s, is applied at
inference to each sample whose state lies within `radius` (a quantile of the source samples'
Mahalanobis distances, times `radius_scale`) of the source; the decision is per sample, on the
prompt's last position. With several edits a sample takes the map of the nearest source that
admits it. Undo removes the edit's map, and the hook with the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common import EditRequest, TrainPool
from common.prompt import Prompt
from editors.base import BatchEdit
from lalms.base import LALM, hidden, with_hidden
from lalms.hooks import Hooks, Trace
from lalms.rows import UNEDITED, RowEdits, RowsMemory


@dataclass(frozen=True)
class SteeringHParams:
    samples: int  # train-split questions per Gaussian
    shrinkage: float  # covariance shrinkage towards the mean variance
    radius_quantile: float  # the gate: this quantile of the source's Mahalanobis distances ...
    radius_scale: float  # ... times this
    seed: int  # which train-split questions are drawn


def sqrtm(c: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh(c)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian(x: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of rows `x`, the covariance shrunk towards its mean variance."""
    mu = x.mean(0)
    centred = x - mu
    c = centred.T @ centred / max(len(x) - 1, 1)
    target = c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)
    return mu, (1 - shrinkage) * c + shrinkage * target


def monge_map(mu_s, c_s, mu_t, c_t) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) of the optimal transport map between two Gaussians: x -> A x + b."""
    root = sqrtm(c_s)
    inv_root = torch.linalg.inv(root)
    a = inv_root @ sqrtm(root @ c_t @ root) @ inv_root
    return a, mu_t - a @ mu_s


@dataclass
class SteeringMap:
    a: torch.Tensor
    b: torch.Tensor
    mu: torch.Tensor  # the source mean
    precision: torch.Tensor  # the source covariance's inverse
    radius: float

    def distance(self, h: torch.Tensor) -> torch.Tensor:
        d = h - self.mu
        return ((d @ self.precision) * d).sum(-1).clamp(min=0).sqrt()


def steer(last: torch.Tensor, maps: Sequence[SteeringMap]) -> torch.Tensor | None:
    """States `last` [B, d] moved by the map of the nearest source that admits each (None:
    none is admitted)."""
    best = torch.full((len(last),), -1, dtype=torch.long, device=last.device)
    nearest = torch.full((len(last),), float("inf"), device=last.device)
    for i, m in enumerate(maps):
        d = m.distance(last)
        take = (d <= m.radius) & (d < nearest)
        best, nearest = torch.where(take, i, best), torch.where(take, d, nearest)
    if not bool((best >= 0).any()):
        return None
    steered = last.clone()
    for i, m in enumerate(maps):
        rows = best == i
        if rows.any():
            steered[rows] = last[rows] @ m.a.T + m.b
    return steered


class Steering:
    HParams = SteeringHParams

    def __init__(self, lalm: LALM, hp: SteeringHParams, pool: TrainPool) -> None:
        self.lalm, self.hp, self.pool = lalm, hp, pool
        self.layer = lalm.model.get_submodule(lalm.edit_sites.resolve("llm.layers.-1"))
        self.maps: list[SteeringMap] = []
        self._hook: Hooks | None = None  # the steering hook, while there are maps
        self._paused = False

    # ------------------------------------------------------------------ fitting
    def states(self, prompts: list[Prompt]) -> torch.Tensor:
        """The unsteered last layer's output at the last prompt position, per prompt (float)."""
        self._paused = True
        try:
            with Trace(self.layer) as t, torch.no_grad():
                self.lalm.logits(self.lalm.to_device(self.lalm.encode(prompts)))
        finally:
            self._paused = False
        return t.output[:, -1].float()

    def prompts(self, attribute: str, label: str) -> list[Prompt]:
        prompts = self.pool.label_questions(attribute, label, self.hp.samples, self.hp.seed)
        if not prompts:
            raise ValueError(f"steering: the train split has no {attribute} clips labelled {label!r}")
        return prompts

    def fit(self, request: EditRequest) -> SteeringMap:
        hp = self.hp
        source = self.states([request.prompt, *self.prompts(request.attribute, request.original)])
        target = self.states(self.prompts(request.attribute, request.target))
        mu_s, c_s = gaussian(source, hp.shrinkage)
        mu_t, c_t = gaussian(target, hp.shrinkage)
        a, b = monge_map(mu_s, c_s, mu_t, c_t)
        fitted = SteeringMap(a, b, mu_s, torch.linalg.inv(c_s), 0.0)
        distances = fitted.distance(source)
        fitted.radius = hp.radius_scale * float(torch.quantile(distances, hp.radius_quantile))
        return fitted

    # ------------------------------------------------------------------ steering
    def _steer(self, module, args, out):
        h = hidden(out)
        if self._paused or h.shape[1] == 1:  # reading states, or a decoding step (already steered)
            return out
        steered = steer(h[:, -1].float(), self.maps)
        if steered is None:
            return out
        h = h.clone()
        h[:, -1] = steered.to(h.dtype)
        return with_hidden(out, h)

    def routed(self, prompts: list[Prompt]) -> torch.Tensor:
        """Which prompts fall within an edit's source region."""
        if not self.maps:
            return torch.zeros(len(prompts), dtype=torch.bool)
        last = self.states(prompts)
        return torch.stack([m.distance(last) <= m.radius for m in self.maps]).any(0)

    def apply(self, request: EditRequest) -> SteeringHandle:
        fitted = self.fit(request)  # on unsteered states
        self.maps.append(fitted)
        if self._hook is None:
            self._hook = Hooks().add(self.layer, self._steer)
        return SteeringHandle(self, fitted)

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once, each seen by its own rows: a row is steered by its own
        group's maps only (fitted on unsteered states, as `apply`)."""
        maps: list[list[SteeringMap]] = [[] for _ in requests]
        path = self.lalm.edit_sites.resolve("llm.layers.-1")

        def add(edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
            with edits.only(UNEDITED):
                for g, request in pairs:
                    maps[g].append(self.fit(request))

        def rows_steer(module, args, out, groups):
            h = hidden(out)
            if h.shape[1] == 1 or bool((groups < 0).all()):  # a decoding step, or nothing to steer
                return out
            h = h.clone()
            for g in groups.unique().tolist():
                rows = (groups == g).nonzero().flatten()
                steered = steer(h[rows, -1].float(), maps[g]) if g >= 0 else None
                if steered is not None:
                    h[rows, -1] = steered.to(h.dtype)
            return with_hidden(out, h)

        batch = BatchEdit(self.lalm, len(requests), add)
        batch.edits.hook(path, rows_steer)
        batch.add(requests)
        return batch

    def rows_memory(self, tokens: int) -> RowsMemory:
        """An edit's map: A and the source precision (d x d, float32), b and the mean."""
        d = self.layer.mlp.down_proj.out_features if hasattr(self.layer, "mlp") else 0
        return RowsMemory(per_edit=(2 * d * d + 2 * d) * 4)


class SteeringHandle:
    """Undo removes the edit's map (and the hook with the last map)."""

    def __init__(self, editor: Steering, fitted: SteeringMap) -> None:
        self.editor, self.fitted, self.done = editor, fitted, False

    def undo(self) -> None:
        if self.done:
            raise RuntimeError("this edit was already undone")
        e = self.editor
        e.maps = [m for m in e.maps if m is not self.fitted]
        if not e.maps and e._hook is not None:
            e._hook.remove()
            e._hook = None
        self.done = True

"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022).

For each edited linear layer W [d_out, d_in] the gradient of the edit loss is a sum of rank-1
outer products delta_i x_i^T over token positions i (x: the layer's input, delta: the gradient
of its output). MEND transforms each (x_i, delta_i) pair with a small network and rebuilds a
pseudo-gradient from the transformed pairs, so the update stays low-rank and cheap for any
layer width:

    x, delta   <- normalised by running statistics (buffers: a resumed run keeps them)
    (x', d')   <- g_shape([x, delta] * scale[p] + shift[p])   one network per weight shape,
                                                              per-parameter scale and shift
    W_new      =  W - edit_lr[p] * sum_i d'_i x'_i^T

The networks are stacks of low-rank residual layers initialised to the identity, so an
untrained MEND takes a plain gradient step scaled by edit_lr. The update is returned in the
low-rank form editors/hypernet.py applies; the base model stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common import EditRequest, TrainPool
from editors.hypernet import Captured, HyperNetwork, LowRankDelta
from lalms.base import LALM


@dataclass(frozen=True)
class MENDHParams:
    layers: tuple[int, ...] | None  # LLM layers edited; None: the model's edit_layers
    projections: tuple[str, ...]  # their MLP projections edited
    edit_lr: float  # the initial learned step per edited weight
    rank: int  # the gradient networks' low-rank residual width (capped at d_in + d_out)
    n_layers: int  # residual layers per gradient network


class RunningNorm(nn.Module):
    """Running mean and variance of feature vectors, merged batch by batch (Chan et al.)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta**2 * self.count * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        var = (self.m2 / (self.count - 1)).to(x.dtype)
        return (x - self.mean.to(x.dtype)) / torch.sqrt(var + self.eps)


class LowRankResidual(nn.Module):
    """h + up(relu(down(h))), with `up` zero-initialised: the identity at initialisation."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


class GradientTransform(nn.Module):
    """The network shared by all edited parameters of one shape, with per-parameter scale/shift."""

    def __init__(self, d_in: int, d_out: int, n_params: int, rank: int, n_layers: int) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in = d_in
        self.layers = nn.Sequential(*[LowRankResidual(dim, min(rank, dim)) for _ in range(n_layers)])
        self.scale = nn.Parameter(torch.ones(n_params, dim))
        self.shift = nn.Parameter(torch.zeros(n_params, dim))

    def forward(self, x: torch.Tensor, delta: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([x, delta], dim=-1) * self.scale[index] + self.shift[index]
        h = self.layers(h)
        return h[:, : self.d_in], h[:, self.d_in :]


class MEND(HyperNetwork):
    """MEND's trainable part for the edited linear weights of one model."""

    HParams = MENDHParams

    def __init__(self, lalm: LALM, hp: MENDHParams, pool: TrainPool) -> None:
        super().__init__(lalm, hp.layers, hp.projections)
        self.hp = hp
        self.shape_keys = [f"{o}x{i}" for o, i in self.shapes]
        counts: dict[str, int] = {}
        self.shape_index = []  # the parameter's row in its shape's scale/shift
        for key in self.shape_keys:
            self.shape_index.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.transforms = nn.ModuleDict()
        for key, (d_out, d_in) in zip(self.shape_keys, self.shapes, strict=True):
            if key not in self.transforms:
                self.transforms[key] = GradientTransform(d_in, d_out, counts[key], hp.rank, hp.n_layers)
        self.x_norms = nn.ModuleList([RunningNorm(d_in) for _, d_in in self.shapes])
        self.delta_norms = nn.ModuleList([RunningNorm(d_out) for d_out, _ in self.shapes])
        self.edit_lrs = nn.Parameter(torch.full((len(self.shapes),), float(hp.edit_lr)))

    def deltas(
        self, requests: Sequence[EditRequest], captured: Sequence[Sequence[Captured]]
    ) -> list[list[LowRankDelta]]:
        """Transform every edit's (x, delta) pairs; the positions of all edits go through at once.

        In training mode the running statistics first absorb this batch (as MEND does).
        """
        out: list[list[LowRankDelta]] = [[] for _ in captured]
        for i in range(len(self.shapes)):
            counts = [len(c[i].x) for c in captured]
            x = torch.cat([c[i].x for c in captured]).float()
            d = torch.cat([c[i].delta for c in captured]).float()
            if self.training:
                self.x_norms[i].update(x)
                self.delta_norms[i].update(d)
            x2, d2 = self.transforms[self.shape_keys[i]](
                self.x_norms[i](x), self.delta_norms[i](d), self.shape_index[i]
            )
            for b, (xb, db) in enumerate(zip(x2.split(counts), d2.split(counts), strict=True)):
                # W_new = W - edit_lr * sum_n d'_n^T x'_n
                out[b].append(LowRankDelta(left=-self.edit_lrs[i] * db, right=xb))
        return out

"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., 2022).

For each edited linear layer W [d_out, d_in] the gradient of the edit loss is a sum of rank-1
outer products delta_n x_n^T over token positions n (x: the layer's input, delta: the gradient
of its output). MEND transforms each (x_n, delta_n) pair with a small network and rebuilds a
pseudo-gradient from the transformed pairs, so the update stays low-rank for any layer width.
This is what the reference code computes (eric-mitchell/mend `algs/mend.py`, `nn.py`; the same
code in EasyEdit's `trainer/algs/MEND.py`, `local_nn.py`, which SAKE ran), checked tensor by
tensor against it (tests/test_hypernet_reference.py):

1. positions where x or delta is all zero are dropped (editors/hypernet.py: nonzero_rows);
2. training only: running mean and variance of x and of delta absorb the kept positions (one
   count for both; Welford's update, merged a batch at a time here), before they normalise
   them: x^ = (x - mean_x) / (std_x + 1e-7), std the sample standard deviation;
3. h_0 = [x^, delta^]; for each of the n_hidden + 1 layers
       h_{l+1} = h_l + relu((U_l V_l h_l + b_l) * scale_l[m] + shift_l[m])
   (U zero- and V standard-normal-initialised: the identity at first; the ReLU in every layer);
   x' and delta' are the first d_in and last d_out entries of the last h;
4. dW = sum_n delta'_n x'_n^T, and W_new = W - edit_lr[p] * dW with one learned edit_lr per
   weight.

`shared: true` (SAKE's setting) keeps one network and one set of statistics per weight shape,
used by all weights of that shape with a learned scale and shift (mode m) per weight;
`shared: false` one network per weight, without modes.

The sign: the paper's rule subtracts (W - lr * dW), the reference code adds (its
`p + updates[n]`, eric-mitchell/mend issue #13). Here the update subtracts, as the paper has
it; the learned edit_lr can take either sign, so a trained reference MEND with the rates
negated is the same editor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common import TrainPool
from editors.hypernet import EditCapture, HyperNetwork, LowRankDelta
from lalms.base import LALM

STD_EPS = 1e-7  # added to the standard deviation, as the reference does


@dataclass(frozen=True)
class MENDHParams:
    layers: tuple[int, ...] | None  # LLM layers edited; None: the model's edit_layers
    projections: tuple[str, ...]  # their MLP projections edited
    edit_lr: float  # the initial learned step per edited weight
    rank: int  # the networks' low-rank width (capped at d_in + d_out)
    n_hidden: int  # the networks have n_hidden + 1 layers (SAKE: 1, two layers)
    shared: bool  # one network and statistics per weight shape, a learned mode per weight


class RunningStats(nn.Module):
    """Running mean and sum of squared deviations of x and delta over the positions seen.

    Buffers, so a resumed run continues with the same statistics. Merged a batch of positions
    at a time (Chan et al.), which equals the reference's one-position-at-a-time Welford update.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("x_mean", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("x_m2", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("delta_mean", torch.zeros(d_out, dtype=torch.float64))
        self.register_buffer("delta_m2", torch.zeros(d_out, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        total = self.count + n
        for values, mean, m2 in ((x, self.x_mean, self.x_m2), (delta, self.delta_mean, self.delta_m2)):
            values = values.detach().to(torch.float64)
            batch_mean = values.mean(0)
            shift = batch_mean - mean
            m2 += ((values - batch_mean) ** 2).sum(0) + shift**2 * self.count * n / total
            mean += shift * n / total
        self.count.copy_(total)

    def std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample standard deviations of x and delta (count - 1 in the denominator)."""
        dof = self.count - 1
        return (self.x_m2 / dof).sqrt(), (self.delta_m2 / dof).sqrt()

    def normalise(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v - mean) / (std + 1e-7). Before two positions were seen (an untrained editor) the
        inputs pass unchanged; the reference has no statistics then and stops."""
        if self.count < 2:
            return x, delta
        x_std, delta_std = self.std()
        return (
            (x - self.x_mean.to(x.dtype)) / (x_std.to(x.dtype) + STD_EPS),
            (delta - self.delta_mean.to(delta.dtype)) / (delta_std.to(delta.dtype) + STD_EPS),
        )


class IdentityInitLayer(nn.Module):
    """h + relu((U V h + b) * scale[m] + shift[m]): the identity at initialisation (U = 0)."""

    def __init__(self, dim: int, rank: int, n_modes: int | None) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.randn(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        z = (h @ self.v.T) @ self.u.T + self.bias
        if mode is not None:
            z = z * self.mode_scale[mode] + self.mode_shift[mode]
        return h + z.clamp(min=0)  # clamp, as the reference: relu's gradient at 0 would be 0 too


class GradientTransform(nn.Module):
    """One network over [x, delta] (d_in + d_out wide) and the statistics that normalise its
    inputs; with `n_modes`, a learned scale and shift per weight that uses it."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int | None) -> None:
        super().__init__()
        dim = d_in + d_out
        self.d_in = d_in
        self.stats = RunningStats(d_in, d_out)
        self.layers = nn.ModuleList(
            [IdentityInitLayer(dim, min(rank, dim), n_modes) for _ in range(n_hidden + 1)]
        )

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor, mode: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (x, delta) -> the transformed factors (x', delta')."""
        h = torch.cat([x, delta], dim=-1)
        for layer in self.layers:
            h = layer(h, mode)
        return h[:, : self.d_in], h[:, self.d_in :]


class MENDTransforms(nn.Module):
    """MEND's trainable part for weights of the given (d_out, d_in) shapes, in edit order:
    the gradient networks, their statistics and one learned step size per weight."""

    def __init__(self, shapes: Sequence[tuple[int, int]], hp: MENDHParams) -> None:
        super().__init__()
        # the network of weight i (its key) and its mode: its index among the weights of its shape
        self.keys: list[str] = []
        self.modes: list[int | None] = []
        counts: dict[str, int] = {}
        for i, (d_out, d_in) in enumerate(shapes):
            key = f"{d_out}x{d_in}" if hp.shared else f"weight{i}"
            self.keys.append(key)
            self.modes.append(counts.get(key, 0) if hp.shared else None)
            counts[key] = counts.get(key, 0) + 1
        self.networks = nn.ModuleDict()
        for key, (d_out, d_in) in zip(self.keys, shapes, strict=True):
            if key not in self.networks:
                n_modes = counts[key] if hp.shared else None
                self.networks[key] = GradientTransform(d_in, d_out, hp.rank, hp.n_hidden, n_modes)
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(hp.edit_lr)))

    def transform(self, i: int, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight i's kept positions (x [N, d_in], delta [N, d_out]) -> (x', delta'). In training
        mode the statistics of its network first absorb these positions (as the reference)."""
        net = self.networks[self.keys[i]]
        x, delta = x.float(), delta.float()
        if self.training:
            net.stats.update(x, delta)
        return net(*net.stats.normalise(x, delta), self.modes[i])

    def update(self, i: int, x: torch.Tensor, delta: torch.Tensor) -> LowRankDelta:
        """Weight i's update from one edit's positions: W_new = W - edit_lr[i] * sum_n delta'_n^T x'_n."""
        x_out, delta_out = self.transform(i, x, delta)
        return LowRankDelta(left=-self.edit_lrs[i] * delta_out, right=x_out)


class MEND(HyperNetwork):
    """MEND for the edited linear weights of one model."""

    HParams = MENDHParams

    def __init__(self, lalm: LALM, hp: MENDHParams, pool: TrainPool) -> None:
        super().__init__(lalm, hp.layers, hp.projections)
        self.hp = hp
        self.mend = MENDTransforms(self.shapes, hp)

    @property
    def edit_lrs(self) -> nn.Parameter:
        return self.mend.edit_lrs

    def deltas(self, captured: Sequence[EditCapture]) -> list[list[LowRankDelta]]:
        """Each edit's update, edit after edit and weight after weight in edit order: in training
        the statistics grow as over the reference's single-edit steps (a batch of one, two
        accumulated), each edit normalised with the positions up to its own."""
        return [
            [self.mend.update(i, layer.x, layer.delta) for i, layer in enumerate(cap.layers)]
            for cap in captured
        ]

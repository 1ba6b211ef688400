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
untrained MEND takes a plain gradient step scaled by edit_lr. Edited models are evaluated with
`torch.func.functional_call` on the replaced parameters only; the base model stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editors.base import EditRequest, WeightSnapshot
from lalms.base import LALM, answer_nll
from lalms.prompt import Prompt


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

    def __init__(self, d_in: int, d_out: int, n_params: int, rank: int = 1920, n_layers: int = 1) -> None:
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


@dataclass
class Captured:
    """Layer inputs and output gradients of one edited linear layer, over valid positions."""

    x: torch.Tensor  # [N, d_in]
    delta: torch.Tensor  # [N, d_out]


class MEND(nn.Module):
    """The trainable part of MEND for a set of edited linear weights of one model."""

    def __init__(
        self,
        lalm: LALM,
        sites: Sequence[str],
        edit_lr: float = 1e-4,
        rank: int = 1920,
        n_layers: int = 1,
    ) -> None:
        super().__init__()
        self.lalm = [lalm]  # a list keeps the base model out of this module's state
        self.sites = list(sites)
        model = lalm.model
        self.module_paths = [lalm.edit_sites.resolve(s) for s in self.sites]
        self.param_names = [f"{path}.weight" for path in self.module_paths]
        modules = [model.get_submodule(p) for p in self.module_paths]
        for path, mod in zip(self.module_paths, modules, strict=True):
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"MEND edits linear layers; {path} is a {type(mod).__name__}")
        shapes = [tuple(m.weight.shape) for m in modules]  # (d_out, d_in)
        self.shape_keys = [f"{o}x{i}" for o, i in shapes]
        counts: dict[str, int] = {}
        self.shape_index = []
        for key in self.shape_keys:
            self.shape_index.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.transforms = nn.ModuleDict()
        for key, (d_out, d_in) in zip(self.shape_keys, shapes, strict=True):
            if key not in self.transforms:
                self.transforms[key] = GradientTransform(d_in, d_out, counts[key], rank, n_layers)
        self.x_norms = nn.ModuleList([RunningNorm(m.in_features) for m in modules])
        self.delta_norms = nn.ModuleList([RunningNorm(m.out_features) for m in modules])
        self.edit_lrs = nn.Parameter(torch.full((len(modules),), float(edit_lr)))

    @property
    def model(self) -> nn.Module:
        return self.lalm[0].model

    # ------------------------------------------------------------------ gradient capture
    def capture(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[Captured]:
        """Inputs and output gradients of the edited layers for the edit loss (no weight grads)."""
        lalm, model = self.lalm[0], self.model
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}

        def hook(i: int):
            def fn(_mod, args, out):
                inputs[i] = args[0].detach()
                if not out.requires_grad:  # frozen base model: make the output a leaf we can differentiate
                    out.requires_grad_(True)
                outputs[i] = out

            return fn

        handles = [
            model.get_submodule(p).register_forward_hook(hook(i)) for i, p in enumerate(self.module_paths)
        ]
        try:
            with torch.enable_grad():
                batch = lalm.encode(prompts, answers)
                logits = lalm.logits(batch)
                loss = answer_nll(logits, batch["labels"].to(logits.device))
                grads = torch.autograd.grad(loss, [outputs[i] for i in range(len(self.module_paths))])
        finally:
            for h in handles:
                h.remove()
        mask = batch["attention_mask"].to(logits.device).bool().reshape(-1)
        captured = []
        for i, g in enumerate(grads):
            x = inputs[i].reshape(-1, inputs[i].shape[-1])[mask]
            d = g.detach().reshape(-1, g.shape[-1])[mask]
            keep = (x.abs().sum(-1) > 0) | (d.abs().sum(-1) > 0)  # drop positions where both vanish
            captured.append(Captured(x[keep], d[keep]))
        return captured

    # ------------------------------------------------------------------ the edit
    def new_params(self, captured: Sequence[Captured], update_stats: bool = False) -> dict[str, torch.Tensor]:
        """Edited weights for the captured edit loss, as a name -> tensor map (differentiable)."""
        params = dict(self.model.named_parameters())
        out = {}
        for i, cap in enumerate(captured):
            if update_stats:
                self.x_norms[i].update(cap.x)
                self.delta_norms[i].update(cap.delta)
            x = self.x_norms[i](cap.x.float())
            d = self.delta_norms[i](cap.delta.float())
            x2, d2 = self.transforms[self.shape_keys[i]](x, d, self.shape_index[i])
            pseudo_grad = d2.T @ x2  # [d_out, d_in], a sum of rank-1 terms
            weight = params[self.param_names[i]]
            out[self.param_names[i]] = weight - (self.edit_lrs[i] * pseudo_grad).to(weight.dtype)
        return out

    def edit_params(self, request: EditRequest) -> dict[str, torch.Tensor]:
        return self.new_params(self.capture([request.prompt], [request.target]))


class MENDEditor:
    """The Editor protocol over a trained MEND: `apply` writes the edited weights in place."""

    def __init__(self, mend: MEND) -> None:
        self.mend = mend.eval()

    def apply(self, request: EditRequest) -> WeightSnapshot:
        """Write the edited weights in place; the returned snapshot's `undo` restores them bitwise."""
        with torch.no_grad():
            new = {k: v.detach() for k, v in self.mend.edit_params(request).items()}
        params = dict(self.mend.model.named_parameters())
        snapshot = WeightSnapshot(self.mend.model, list(new))
        with torch.no_grad():
            for name, value in new.items():
                params[name].copy_(value)
        return snapshot

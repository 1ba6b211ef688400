"""What the hypernetwork editors (MEND, KE) share: gradient capture, low-rank edits, exact undo.

Both editors turn the gradient of an edit loss into a weight update for a few linear layers of
the LLM. For a linear layer y = x W^T the gradient is a sum over token positions of outer
products delta_n^T x_n (delta: the gradient of the layer output, x: its input), and both
editors' updates stay in that low-rank form:

    dW = L^T R,   L [r, d_out],   R [r, d_in]

which is all an edit needs:
- applied to a model (evaluation), W + L^T R replaces W, through `torch.func.functional_call`
  for a trial or in place with a `WeightSnapshot` for exact undo;
- in meta-training, B different edits share one batched forward: the rows of edit b get
  x (W + L_b^T R_b)^T = x W^T + (x R_b^T) L_b, added by a forward hook (`row_edits`). This equals
  `functional_call` with each edit's replaced weights (tested) without materialising B weights.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from common import EditRequest
from editors.base import BatchEdit, WeightSnapshot
from lalms.base import LALM, answer_nll
from lalms.hooks import Hook, hooked_all
from lalms.rows import UNEDITED, RowEdits, RowsMemory, low_rank_memory


@dataclass
class Captured:
    """Inputs and output gradients of one edited linear layer over one edit's positions that
    carry both (`nonzero_rows`)."""

    x: torch.Tensor  # [N, d_in]
    delta: torch.Tensor  # [N, d_out]


@dataclass
class EditCapture:
    """What an edit's hypernetwork reads: its gradients per edited layer and its own tokens."""

    layers: list[Captured]  # in `param_names` order
    tokens: torch.Tensor  # [T] the edit row's token ids (prompt and answer, padding removed)


def nonzero_rows(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Positions kept for an edit, as the reference MEND keeps them: x AND delta non-zero.

    A position without gradient (delta = 0: at the top edited layer every position but the
    answer's) adds nothing to the gradient, and must not reach MEND's statistics or networks,
    where normalisation would turn its zero into a non-zero input.
    """
    return (x != 0).any(-1) & (delta != 0).any(-1)


@dataclass
class LowRankDelta:
    """A weight update dW = left^T @ right of a linear layer."""

    left: torch.Tensor  # [r, d_out]
    right: torch.Tensor  # [r, d_in]

    def dense(self) -> torch.Tensor:
        return self.left.T @ self.right

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x dW^T for inputs x [..., d_in], through whichever form costs fewer operations."""
        rank, (d_out, d_in) = self.left.shape[0], (self.left.shape[1], self.right.shape[1])
        if rank * (d_in + d_out) > d_in * d_out:  # more positions than a dense update is worth
            return x @ self.dense().T.to(x.dtype)
        return (x @ self.right.T.to(x.dtype)) @ self.left.to(x.dtype)


class HyperNetwork(nn.Module, abc.ABC):
    """The trainable part of a gradient-based editor for a set of linear layers of one model.

    Subclasses implement `deltas`: from each edit's captured gradients (and its tokens, for
    editors that condition on the edit), one `LowRankDelta` per edited layer per edit.
    The base model is held outside this module's parameters and state: checkpoints and exports
    carry the editor only.
    """

    def __init__(self, lalm: LALM, layers: Sequence[int] | None, projections: Sequence[str]) -> None:
        """`layers`: the LLM layers whose MLP `projections` are edited (None: the model's
        edit_layers, configs/model/*.yaml)."""
        super().__init__()
        self._lalm = [lalm]  # a list keeps the base model out of this module's parameters
        layers = list(layers) if layers is not None else list(lalm.edit_layers)
        if not layers:
            raise ValueError("no edit layers: set model.edit_layers or the editor's `layers`")
        self.sites = [f"llm.layers.{layer}.mlp.{proj}" for layer in layers for proj in projections]
        self.module_paths = [lalm.edit_sites.resolve(s) for s in self.sites]
        self.param_names = [f"{path}.weight" for path in self.module_paths]
        self.shapes: list[tuple[int, int]] = []  # (d_out, d_in)
        for path in self.module_paths:
            mod = lalm.model.get_submodule(path)
            if not isinstance(mod, nn.Linear):
                raise TypeError(
                    f"{type(self).__name__} edits linear layers; {path} is a {type(mod).__name__}"
                )
            self.shapes.append(tuple(mod.weight.shape))

    @property
    def lalm(self) -> LALM:
        return self._lalm[0]

    # ------------------------------------------------------------------ each editor's rule
    @abc.abstractmethod
    def deltas(self, captured: Sequence[EditCapture]) -> list[list[LowRankDelta]]:
        """One LowRankDelta per edited layer (in `param_names` order) for each edit."""

    # ------------------------------------------------------------------ gradient capture
    def capture(
        self, batch: Mapping[str, torch.Tensor], edit_rows: Sequence[int]
    ) -> tuple[list[EditCapture], torch.Tensor]:
        """Edit-loss gradients at the edited layers, one edit per row in `edit_rows`.

        One forward over the whole encoded batch (which may hold other rows, e.g. locality
        queries whose pre-edit logits are wanted too): the loss is the sum over edit rows of each
        row's mean answer NLL, so each edit's captured gradient is exactly its own loss's, and
        rows never mix (positions belong to one row). Returns (per edit its EditCapture; the
        batch's detached pre-edit logits).
        """
        model = self.lalm.model
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}

        def hook(i: int):
            def fn(_mod, args, out):
                inputs[i] = args[0].detach()
                if not out.requires_grad:  # frozen base model: differentiate w.r.t. the output itself
                    out.requires_grad_(True)
                outputs[i] = out

            return fn

        hooks = [Hook(model.get_submodule(path), hook(i)) for i, path in enumerate(self.module_paths)]
        with hooked_all(hooks), torch.enable_grad():
            logits = self.lalm.logits(batch)
            labels = batch["labels"].to(logits.device)
            rows = torch.as_tensor(list(edit_rows), device=logits.device)
            loss = answer_nll(logits[rows], labels[rows], reduction="none").sum()
            grads = torch.autograd.grad(loss, [outputs[i] for i in range(len(self.module_paths))])
        mask = batch["attention_mask"].to(logits.device).bool()
        ids = batch["input_ids"].to(mask.device)
        captured: list[EditCapture] = []
        for row in edit_rows:
            per_layer = []
            for i, g in enumerate(grads):
                x, d = inputs[i][row][mask[row]], g[row][mask[row]].detach()
                keep = nonzero_rows(x, d)
                per_layer.append(Captured(x[keep], d[keep]))
            captured.append(EditCapture(per_layer, ids[row][mask[row]]))
        return captured, logits.detach()

    # ------------------------------------------------------------------ applying edits
    def edit_params(self, request: EditRequest) -> dict[str, torch.Tensor]:
        """The edited weights for one request, as a name -> tensor map (for functional_call)."""
        batch = self.lalm.encode([request.prompt], [request.target])
        captured, _ = self.capture(batch, [0])
        (deltas,) = self.deltas(captured)
        params = dict(self.lalm.model.named_parameters())
        return {
            name: params[name] + d.dense().to(params[name].dtype)
            for name, d in zip(self.param_names, deltas, strict=True)
        }

    @contextmanager
    def row_edits(
        self, deltas: Sequence[Sequence[LowRankDelta]], rows: Sequence[Sequence[int]]
    ) -> Iterator[None]:
        """Within the block, model rows `rows[b]` run with edit b applied (see the module
        docstring; lalms/rows.py, which the sweeps' batched edits use too). Gradients flow to
        the deltas' factors."""
        if len(deltas) != len(rows):
            raise ValueError(f"{len(deltas)} edits but {len(rows)} row groups")
        groups = [UNEDITED] * (1 + max((r for rs in rows for r in rs), default=-1))
        for b, rs in enumerate(rows):
            for r in rs:
                groups[r] = b
        edits = RowEdits(self.lalm.model, self.lalm.edit_sites, len(deltas))
        for b, per_layer in enumerate(deltas):
            for path, d in zip(self.module_paths, per_layer, strict=True):
                edits.push(path, b, d.left, d.right)
        try:
            with edits.assign(groups):
                yield
        finally:
            edits.remove()

    def fingerprint(self) -> str:
        """A digest of the base model's edited weights: which model an editor was trained on."""
        h = hashlib.sha256()
        params = dict(self.lalm.model.named_parameters())
        for name in self.param_names:
            h.update(name.encode())
            h.update(params[name].detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


class HypernetEditor:
    """The Editor protocol over a trained hypernetwork: `apply` writes edited weights in place."""

    def __init__(self, network: HyperNetwork) -> None:
        self.network = network.eval()

    def apply(self, request: EditRequest) -> WeightSnapshot:
        """Write the edited weights in place; the returned snapshot's `undo` restores them bitwise."""
        with torch.no_grad():
            new = {k: v.detach() for k, v in self.network.edit_params(request).items()}
        model = self.network.lalm.model
        snapshot = WeightSnapshot(model, list(new))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in new.items():
                params[name].copy_(value)
        return snapshot

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once (editors/base.py), each seen by its own rows: one batched
        forward/backward over the K edit prompts captures every edit's gradients, each on the
        model as its group's earlier edits left it; each update stays factored."""
        net = self.network

        def add(edits: RowEdits, pairs: Sequence[tuple[int, EditRequest]]) -> None:
            prompts = [r.prompt for _, r in pairs]
            groups = [g for g, _ in pairs]
            batch = net.lalm.encode(prompts, [r.target for _, r in pairs])
            with edits.rows(prompts, groups):
                captured, _ = net.capture(batch, range(len(pairs)))
            with torch.no_grad():
                deltas = net.deltas(captured)
            for g, per_layer in zip(groups, deltas, strict=True):
                for path, d in zip(net.module_paths, per_layer, strict=True):
                    edits.push(path, g, d.left.detach(), d.right.detach())

        batch = BatchEdit(net.lalm, len(requests), add)
        batch.add(requests)
        return batch

    def rows_memory(self, tokens: int) -> RowsMemory:
        """An edit's factors: of rank at most the edit prompt's `tokens` (positions) per layer."""
        return low_rank_memory(self.network.shapes, tokens, self.network.lalm.model.dtype)

"""WISE: a side memory beside one MLP down-projection, with per-sample routing.

The side memory is a trainable copy W' of the down-projection W of one late LLM layer; W itself
never changes. For an input, the activation distance is

    d(x) = mean over the sample's relevant positions t of || a_t (W' - W)^T ||_2

where a_t is the down-projection's input at position t. The relevant positions are the audio
rows when the prompt has audio (an auditory edit is about what the clip sounds like; the chat
scaffolding and question words are shared with every other prompt and would pull every
distance together), and all real (non-padding) positions of a text-only prompt. At inference
each sample of a batch is routed on its own: it uses W' when d(x) exceeds
`act_ratio` times the smallest in-scope distance seen while editing, else W. The decision is
taken on the full prompt and kept while generating.

An edit trains W' (Adam) on a random `mask_ratio` share of its entries (gradient mask, one mask
per edit, as WISE's knowledge shards) with the target's NLL, the edit prompt running through
W', plus margins on d: out-of-scope (preservation inputs from the train split) below `alpha`,
in-scope above `beta`, in-scope above out-of-scope by `gamma`. The preservation inputs'
activations at the layer do not depend on W', so they are computed once. Sequential edits keep
training the same side memory; `undo` restores W' and the threshold exactly and removes the
routing hook when no edit is left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from editors.base import EditRequest
from editors.preservation import preservation_prompts
from lalms.base import LALM, answer_nll
from lalms.prompt import Prompt


def relevant(input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_token_id: int) -> torch.Tensor:
    """(B, T) mask of the positions d averages over: audio rows, or all real ones without audio."""
    audio = input_ids == audio_token_id
    return torch.where(audio.any(-1, keepdim=True), audio, attention_mask.bool())


def distances(x: torch.Tensor, delta_w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """d per sample: mean over masked positions of ||x_t delta_w^T||; x (B, T, d_in), mask (B, T)."""
    norms = F.linear(x, delta_w).norm(dim=-1)  # (B, T)
    if mask is None or mask.shape != norms.shape:
        return norms.mean(-1)
    mask = mask.to(norms.dtype)
    return (norms * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class WISE:
    def __init__(
        self,
        lalm: LALM,
        layer: int,
        preservation_root: str,
        audio_root: str | None = None,
        n_text: int = 10,
        n_audio: int = 10,
        lr: float = 1e-2,
        steps: int = 30,
        mask_ratio: float = 0.2,
        alpha: float = 5.0,
        beta: float = 20.0,
        gamma: float = 10.0,
        act_ratio: float = 0.88,
        seed: int = 0,
    ) -> None:
        self.lalm, self.lr, self.steps, self.mask_ratio = lalm, lr, steps, mask_ratio
        self.alpha, self.beta, self.gamma, self.act_ratio, self.seed = alpha, beta, gamma, act_ratio, seed
        self.path = lalm.edit_sites.llm_mlp(layer, "down_proj")
        self.module = lalm.model.get_submodule(self.path)
        self.side = self.module.weight.detach().clone()
        self.in_scope: list[float] = []  # in-scope distances of the applied edits, in order
        self.preservation = preservation_prompts(
            preservation_root, audio_root, n_text, n_audio, lalm.sampling_rate
        )
        self._out_x: tuple[torch.Tensor, torch.Tensor] | None = None  # preservation activations, mask
        self._mask: torch.Tensor | None = None  # attention mask of the batch being run
        self._route: torch.Tensor | None = None  # per-sample decision, kept while generating
        self._hooks: list = []
        self._applied = 0
        lalm.model.requires_grad_(False)  # only the editor's own copies are trained

    # ------------------------------------------------------------------ activations
    def _forward(self, batch: dict[str, torch.Tensor], params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the layer's inputs x) of one forward over an encoded batch."""
        seen: list[torch.Tensor] = []
        hook = self.module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            logits = self.lalm.logits(batch, params)
        finally:
            hook.remove()
        return logits, seen[0]

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return relevant(input_ids, attention_mask, self.lalm.audio_token_id)

    def _encode(
        self, prompts: Sequence[Prompt], answers: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        return self.lalm.to_device(self.lalm.encode(prompts, answers))

    def out_of_scope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The preservation inputs' activations at the layer (its input: W' does not change them)."""
        if self._out_x is None:
            batch = self._encode(self.preservation)
            with torch.no_grad():
                _, x = self._forward(batch)
            self._out_x = (x.detach(), self.positions(batch["input_ids"], batch["attention_mask"]))
        return self._out_x

    @property
    def threshold(self) -> float:
        return self.act_ratio * min(self.in_scope) if self.in_scope else float("inf")

    # ------------------------------------------------------------------ routing
    def _install_hooks(self) -> None:
        def keep_mask(module, args):  # the token ids reach the embedding in forward and generate alike
            ids = args[0]
            if ids.shape[1] > 1:  # a whole prompt (generation's later steps feed one token)
                self._mask = self.positions(ids, ids != self.lalm.pad_token_id)

        def route(module, args, out):
            x = args[0]
            side = F.linear(x, self.side.to(x.dtype), module.bias)
            if x.shape[1] > 1 or self._route is None or self._route.shape[0] != x.shape[0]:
                d = distances(x, (self.side - module.weight).to(x.dtype), self._mask)
                self._route = d > self.threshold
            return torch.where(self._route[:, None, None], side, out)

        self._hooks = [
            self.lalm.model.get_input_embeddings().register_forward_pre_hook(keep_mask),
            self.module.register_forward_hook(route),
        ]

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._route = [], None

    def routed(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Which samples of a batch go to the side memory (the decision of one forward)."""
        with torch.no_grad():
            self.lalm.logits(self._encode(prompts))
        return self._route.clone() if self._route is not None else torch.zeros(len(prompts), dtype=torch.bool)

    # ------------------------------------------------------------------ editing
    def apply(self, request: EditRequest) -> WiseEdit:
        out_x, out_mask = self.out_of_scope()
        before = (self.side.clone(), list(self.in_scope))
        self._remove_hooks()  # the edit prompt trains through W' directly
        g = torch.Generator().manual_seed(self.seed + self._applied)
        grad_mask = (torch.rand(self.side.shape, generator=g) < self.mask_ratio).to(self.side.device)
        side = self.side.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([side], lr=self.lr)
        batch = self._encode([request.prompt], [request.target])
        in_mask = self.positions(batch["input_ids"], batch["attention_mask"])
        weight = self.module.weight.detach()
        with torch.enable_grad():
            for _ in range(self.steps):
                logits, x_in = self._forward(batch, {f"{self.path}.weight": side})
                d_in = distances(x_in, side - weight, in_mask)
                d_out = distances(out_x, side - weight, out_mask)
                loss = answer_nll(logits, batch["labels"]) + (
                    F.relu(d_out - self.alpha).mean()
                    + F.relu(self.beta - d_in).mean()
                    + F.relu(self.gamma - (d_in.mean() - d_out)).mean()
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                side.grad *= grad_mask
                optimizer.step()
        self.side = side.detach()
        with torch.no_grad():
            _, x = self._forward(batch)
            self.in_scope.append(float(distances(x, self.side - weight, in_mask)[0]))
        self._applied += 1
        self._install_hooks()
        return WiseEdit(self, before)


class WiseEdit:
    """Undo restores the side memory and the in-scope distances as they were before the edit."""

    def __init__(self, wise: WISE, before: tuple[torch.Tensor, list[float]]) -> None:
        self.wise, self.before, self.done = wise, before, False

    def undo(self) -> None:
        if self.done:
            raise RuntimeError("this edit was already undone")
        w = self.wise
        w.side, w.in_scope = self.before
        w._applied -= 1
        w._remove_hooks()
        if w._applied:
            w._install_hooks()
        self.done = True

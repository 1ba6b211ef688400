"""KE: Editing Factual Knowledge in Language Models (De Cao et al., 2021).

A conditioning network reads the edit as text, "{original} >> {target} || {question}", embedded
with the LLM's own (frozen) token embeddings, through a one-layer BiLSTM and a feed-forward layer
to a condition vector c. For each edited weight W [d_out, d_in] a small network maps c to

    r_a, r_b in R^{d_out},  c_a, c_b in R^{d_in},  eta in R
    A = softmax(r_a)^T c_a,   B = softmax(r_b)^T c_b                (rank-1 matrices)
    dW = scale * sigmoid(eta) * (A * grad_W + B)                     (elementwise product)

with grad_W the gradient of the edit loss, a constant. For a linear layer grad_W = Delta^T X
(output gradients and inputs over positions), so A * grad_W = (Delta * softmax(r_a))^T (X * c_a)
and the whole update keeps the low-rank form of editors/hypernet.py without ever forming grad_W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from common import EditRequest, TrainPool
from editors.hypernet import Captured, HyperNetwork, LowRankDelta
from lalms.base import LALM


@dataclass(frozen=True)
class KEHParams:
    layers: tuple[int, ...] | None  # LLM layers edited; None: the model's edit_layers
    projections: tuple[str, ...]  # their MLP projections edited
    lstm_dim: int  # the condition encoder's BiLSTM width
    condition_dim: int
    hidden_dim: int  # each weight's update network's width
    max_scale: float  # the update's largest gate
    zero_shift: bool  # start B at zero (the reference initialises it at random): an untrained
    # KE then leaves locality intact and only rescales the gradient


def condition_text(request: EditRequest) -> str:
    return f"{request.original} >> {request.target} || {request.prompt.question}"


class ConditionEncoder(nn.Module):
    """BiLSTM over frozen token embeddings, then tanh(Linear) of the final states."""

    def __init__(self, embed_dim: int, hidden_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden_dim, condition_dim)

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            embeddings, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)  # h: [2, B, hidden] (forward and backward final states)
        return torch.tanh(self.out(torch.cat([h[0], h[1]], dim=-1)))


class ConditionedUpdate(nn.Module):
    """For one weight [d_out, d_in]: condition -> (r_a, c_a, r_b, c_b, eta)."""

    def __init__(self, d_out: int, d_in: int, condition_dim: int, hidden_dim: int, zero_shift: bool) -> None:
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, 2 * (d_out + d_in) + 1)),
        )
        if zero_shift:  # r_b = c_b = 0 at first: B = 0, the update starts as A * grad_W alone
            last = self.net[2]
            b_rows = slice(d_out + d_in, 2 * (d_out + d_in))
            with torch.no_grad():
                last.parametrizations.weight.original0[b_rows] = 0.0  # weight-norm magnitudes
                last.bias[b_rows] = 0.0

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(condition).split([self.d_out, self.d_in, self.d_out, self.d_in, 1], dim=-1)


class KE(HyperNetwork):
    """KnowledgeEditor's trainable part for the edited linear weights of one model."""

    HParams = KEHParams

    def __init__(self, lalm: LALM, hp: KEHParams, pool: TrainPool) -> None:
        super().__init__(lalm, hp.layers, hp.projections)
        self.hp = hp
        embed_dim = lalm.model.get_input_embeddings().embedding_dim
        self.max_scale = hp.max_scale
        self.encoder = ConditionEncoder(embed_dim, hp.lstm_dim, hp.condition_dim)
        self.updates = nn.ModuleList(
            [
                ConditionedUpdate(d_out, d_in, hp.condition_dim, hp.hidden_dim, hp.zero_shift)
                for d_out, d_in in self.shapes
            ]
        )

    def condition(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        """Condition vectors [B, condition_dim] for a batch of edits."""
        tok = self.lalm.tokenizer
        ids = [
            tok(condition_text(r), add_special_tokens=False).input_ids or [tok.pad_token_id] for r in requests
        ]
        lengths = torch.tensor([len(i) for i in ids])
        padded = torch.full((len(ids), int(lengths.max())), tok.pad_token_id, dtype=torch.long)
        for b, row in enumerate(ids):
            padded[b, : len(row)] = torch.tensor(row)
        embed = self.lalm.model.get_input_embeddings()
        with torch.no_grad():  # the LLM's own embeddings, frozen
            emb = embed(padded.to(embed.weight.device)).float()
        return self.encoder(emb, lengths)

    def deltas(
        self, requests: Sequence[EditRequest], captured: Sequence[Sequence[Captured]]
    ) -> list[list[LowRankDelta]]:
        cond = self.condition(requests)
        out: list[list[LowRankDelta]] = [[] for _ in captured]
        for i, update in enumerate(self.updates):
            r_a, c_a, r_b, c_b, eta = update(cond)
            u_a, u_b = r_a.softmax(-1), r_b.softmax(-1)
            gate = self.max_scale * torch.sigmoid(eta)  # [B, 1]
            for b, cap in enumerate(captured):
                # dW = gate * ((Delta * u_a)^T (X * c_a) + u_b^T c_b)
                left = torch.cat([cap[i].delta.float() * u_a[b], u_b[b : b + 1]]) * gate[b]
                right = torch.cat([cap[i].x.float() * c_a[b], c_b[b : b + 1]])
                out[b].append(LowRankDelta(left=left, right=right))
        return out

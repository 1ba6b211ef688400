"""KE: Editing Factual Knowledge in Language Models (De Cao et al., 2021), as SAKE ran it.

SAKE's KE is EasyEdit's EFK: KnowledgeEditor's one-shot learner (nicola-decao/KnowledgeEditor
`one_shot_learner.py`) inside EasyEdit's `trainer/algs/KE.py` / the SAKE fork's `efk.py`,
meta-trained with the MEND trainer's loss (lit_modules/hypernet.py). Checked tensor by tensor
against the reference (tests/test_hypernet_reference.py):

1. the condition is the edit query itself, the token ids the edit gradient is taken on (chat
   prompt with its audio placeholders and the target answer), embedded by the learner's own
   copy of the LLM's token embeddings (trained; row 0 frozen, the reference's padding_idx);
2. a one-layer BiLSTM reads it; c = tanh(Linear([h_forward_last, h_backward_first]));
3. per edited weight W [d_out, d_in], a weight-normed two-layer network
   (Linear, tanh, Linear) maps c to (c_a [d_in], r_a [d_out], c_b [d_in], r_b [d_out], eta),
   in that order, and
       A = softmax(r_a) c_a^T,   B = softmax(r_b) c_b^T,   s = max_scale * sigmoid(eta)
       dW = s * (A * grad_W + B)        (elementwise),   W_new = W + dW
   with grad_W the gradient of the edit loss, a constant.

For a linear layer grad_W = Delta^T X (output gradients and inputs over positions), so
A * grad_W = (Delta * softmax(r_a))^T (X * c_a) and the update keeps the low-rank form of
editors/hypernet.py without forming grad_W.

Several condition sequences for one edit (zjunlp's `KE.py` takes a batch of them) give one
update: A and B summed over the sequences, s their mean gate. The SAKE fork's `efk.py` takes
one sequence and has no mean; each edit here has one sequence, where both agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from common import TrainPool
from editors.hypernet import Captured, EditCapture, HyperNetwork, LowRankDelta
from lalms.base import LALM


@dataclass(frozen=True)
class KEHParams:
    layers: tuple[int, ...] | None  # LLM layers edited; None: the model's edit_layers
    projections: tuple[str, ...]  # their MLP projections edited
    lstm_dim: int  # the condition encoder's BiLSTM width (the reference: hidden_dim)
    condition_dim: int
    hidden_dim: int  # each weight's update network's width
    max_scale: float  # the update's largest gate (EFK: 1)
    zero_shift: bool  # start B at zero (the reference: random, false)


class ConditionEncoder(nn.Module):
    """Token ids -> condition: own embeddings (initialised from the LLM's), BiLSTM, tanh(Linear)."""

    def __init__(self, embeddings: torch.Tensor, lstm_dim: int, condition_dim: int) -> None:
        super().__init__()
        # the reference's nn.Embedding(padding_idx=0, _weight=...): a trained copy whose row 0
        # never changes (a padding id for the reference's tokenizers; any id for others)
        self.embedding = nn.Embedding.from_pretrained(
            embeddings.detach().float().clone(), freeze=False, padding_idx=0
        )
        self.lstm = nn.LSTM(embeddings.shape[1], lstm_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_dim, condition_dim)

    def states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [R, T] right-padded, lengths [R] -> [h_forward last, h_backward first] [R, 2 * lstm_dim]."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(ids), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)  # h: [2, R, lstm_dim] (forward and backward final states)
        return torch.cat([h[0], h[1]], dim=-1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [R, T] right-padded, lengths [R] -> conditions [R, condition_dim]."""
        return torch.tanh(self.out(self.states(ids, lengths)))


class ConditionedUpdate(nn.Module):
    """For one weight [d_out, d_in]: condition -> (c_a, r_a, c_b, r_b, eta)."""

    def __init__(self, d_out: int, d_in: int, condition_dim: int, hidden_dim: int, zero_shift: bool) -> None:
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, 2 * (d_out + d_in) + 1)),
        )
        if zero_shift:  # c_b = r_b = 0 at first: B = 0, the update starts as A * grad_W alone
            last = self.net[2]
            b_rows = slice(d_in + d_out, 2 * (d_in + d_out))
            with torch.no_grad():
                last.parametrizations.weight.original0[b_rows] = 0.0  # weight-norm magnitudes
                last.bias[b_rows] = 0.0

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(condition).split([self.d_in, self.d_out, self.d_in, self.d_out, 1], dim=-1)

    def delta(self, condition: torch.Tensor, grad: Captured, max_scale: float) -> LowRankDelta:
        """dW = s * (A * grad_W + B) for conditions [R, condition_dim] (one update: A and B
        summed over the R rows, s their mean gate) and grad_W = delta^T x."""
        c_a, r_a, c_b, r_b, eta = self(condition)
        u_a, u_b = r_a.softmax(-1), r_b.softmax(-1)
        scale = max_scale * torch.sigmoid(eta).mean()
        x, d = grad.x.float(), grad.delta.float()
        # A * (Delta^T X) = sum_r (Delta * u_a[r])^T (X * c_a[r])
        left = torch.cat([(d[None] * u_a[:, None]).flatten(0, 1), u_b]) * scale
        right = torch.cat([(x[None] * c_a[:, None]).flatten(0, 1), c_b])
        return LowRankDelta(left=left, right=right)


class OneShotLearner(nn.Module):
    """KE's trainable part for weights of the given (d_out, d_in) shapes."""

    def __init__(self, embeddings: torch.Tensor, shapes: Sequence[tuple[int, int]], hp: KEHParams) -> None:
        super().__init__()
        self.max_scale = hp.max_scale
        self.encoder = ConditionEncoder(embeddings, hp.lstm_dim, hp.condition_dim)
        self.updates = nn.ModuleList(
            [
                ConditionedUpdate(d_out, d_in, hp.condition_dim, hp.hidden_dim, hp.zero_shift)
                for d_out, d_in in shapes
            ]
        )

    def condition(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        """One condition per token sequence [R, condition_dim]."""
        return self.encoder(*self.padded(sequences))

    def padded(self, sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences -> (ids [R, T] right-padded with 0, lengths [R])."""
        lengths = torch.tensor([len(s) for s in sequences])
        if (lengths == 0).any():
            raise ValueError("KE: an edit with no tokens to condition on")
        device = self.encoder.embedding.weight.device
        ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long, device=device)
        for r, seq in enumerate(sequences):
            ids[r, : len(seq)] = seq.to(device)
        return ids, lengths


class KE(HyperNetwork):
    """KnowledgeEditor (EFK) for the edited linear weights of one model."""

    HParams = KEHParams

    def __init__(self, lalm: LALM, hp: KEHParams, pool: TrainPool) -> None:
        super().__init__(lalm, hp.layers, hp.projections)
        self.hp = hp
        self.learner = OneShotLearner(lalm.model.get_input_embeddings().weight, self.shapes, hp)

    def deltas(self, captured: Sequence[EditCapture]) -> list[list[LowRankDelta]]:
        """One condition per edit (all edits through the BiLSTM at once), then each edit's update."""
        conditions = self.learner.condition([cap.tokens for cap in captured])
        return [
            [
                update.delta(conditions[b : b + 1], layer, self.learner.max_scale)
                for update, layer in zip(self.learner.updates, cap.layers, strict=True)
            ]
            for b, cap in enumerate(captured)
        ]

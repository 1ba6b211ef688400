"""DeSTA2.5's `nn` modules: Whisper's encoder tapped by a Q-Former connector, and the LLM that
reads the connector's vectors.

- Whisper's encoder runs without its final layer norm; after each tapped layer (the last of
  each quarter: 7, 15, 23, 31 of large-v3's 32) the connector's BERT encoder (self-attention over
  `prompt_size` learned prompt vectors of that layer, cross-attention to the layer's states)
  reads it; a softmax over the tapped layers, per prompt vector, mixes the results, and
  LayerNorm + Linear take them to the LLM's width.
- In the LLM's input, the placeholder positions (`prompt_size` per clip) take the connector's
  vectors.

State-dict names are the release's: `perception.whisper.*`, `perception.connector.*`,
`llm_model.*`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import BertConfig, GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
from transformers.models.bert.modeling_bert import BertEncoder

from lalms.base import hidden
from lalms.desta.config import DeSTAConfig, tapped_layers


class QformerConnector(nn.Module):
    """Learned prompt vectors per tapped layer, a BERT encoder that cross-attends from them to the
    layer's states, a per-vector softmax over layers, and LayerNorm + Linear into the LLM."""

    def __init__(self, config: DeSTAConfig, encoder: WhisperConfig, llm_hidden: int) -> None:
        super().__init__()
        d = encoder.d_model
        self.target_layer_ids = config.target_layer_ids or tapped_layers(encoder.encoder_layers)
        if max(self.target_layer_ids) >= encoder.encoder_layers:
            raise ValueError(
                f"target_layer_ids {list(self.target_layer_ids)} exceed the encoder's "
                f"{encoder.encoder_layers} layers"
            )
        n = len(self.target_layer_ids)
        self.layer_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(1, config.prompt_size, d)) for _ in range(n)]
        )
        self.layer_weights = nn.Parameter(torch.zeros(config.prompt_size, n))
        bert = BertConfig(
            num_hidden_layers=config.qformer_num_hidden_layers,
            num_attention_heads=encoder.encoder_attention_heads,
            hidden_size=d,
            intermediate_size=config.qformer_intermediate_size,
            add_cross_attention=True,
            is_decoder=True,
        )
        # Eager attention without a mask: the prompt vectors attend to each other both ways, as in
        # the release (SDPA would make the self-attention causal for a decoder config).
        bert._attn_implementation = "eager"
        self.qformer = BertEncoder(bert)
        self.proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, llm_hidden))

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(clips, prompt_size, llm_hidden) from the tapped layers' states (clips, frames, d)."""
        outs = [
            self.qformer(prompt.expand(h.shape[0], -1, -1), encoder_hidden_states=h).last_hidden_state
            for prompt, h in zip(self.layer_prompts, taps, strict=True)
        ]
        mix = self.layer_weights.softmax(dim=-1).unsqueeze(-1)  # (prompt_size, layers, 1)
        return self.proj((torch.stack(outs, dim=2) * mix).sum(dim=2))


class WhisperPerception(nn.Module):
    """Whisper (its encoder feeds the connector; its decoder transcribes) and the connector."""

    def __init__(self, whisper: WhisperForConditionalGeneration, connector: QformerConnector) -> None:
        super().__init__()
        self.whisper = whisper
        self.connector = connector

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        encoder = self.whisper.get_encoder()
        h = nn.functional.gelu(encoder.conv1(input_features))
        h = nn.functional.gelu(encoder.conv2(h)).permute(0, 2, 1)
        h = h + encoder.embed_positions.weight[: h.shape[1]]
        targets = self.connector.target_layer_ids
        taps = []
        for i, layer in enumerate(encoder.layers[: max(targets) + 1]):
            h = hidden(layer(h, None))  # the final layer norm is not applied, as upstream
            if i in targets:
                taps.append(h)
        return self.connector(taps)


class DeSTA25Model(nn.Module):
    """Perception and LLM: the placeholder positions of `input_ids` take the connector's vectors."""

    def __init__(self, perception: WhisperPerception, llm_model: nn.Module, placeholder_id: int) -> None:
        super().__init__()
        self.perception = perception
        self.llm_model = llm_model
        self.placeholder_id = placeholder_id

    @property
    def dtype(self) -> torch.dtype:
        return self.llm_model.dtype

    @property
    def generation_config(self) -> GenerationConfig:
        return self.llm_model.generation_config

    def get_input_embeddings(self) -> nn.Module:
        return self.llm_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm_model.get_output_embeddings()

    @property
    def perception_dtype(self) -> torch.dtype:
        return self.perception.connector.layer_weights.dtype

    def embed(self, input_ids: torch.Tensor, input_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        if input_features is None:
            return embeds
        features = input_features.to(self.perception_dtype)
        audio = self.perception(features).to(embeds.dtype)  # (clips, prompt_size, hidden)
        where = input_ids == self.placeholder_id
        if int(where.sum()) != audio.shape[0] * audio.shape[1]:
            raise ValueError(
                f"{int(where.sum())} placeholder positions for {audio.shape[0]} clips of {audio.shape[1]}"
            )
        # Row-major order of the positions is the clips' order of appearance.
        return embeds.masked_scatter(where.unsqueeze(-1), audio)

    def forward(self, input_ids, attention_mask=None, input_features=None, **kwargs):
        embeds = self.embed(input_ids, input_features)
        return self.llm_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids, attention_mask=None, input_features=None, **kwargs) -> torch.Tensor:
        """The prompt's tokens followed by the generated ones (like a transformers model's)."""
        embeds = self.embed(input_ids, input_features)
        return self.llm_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )

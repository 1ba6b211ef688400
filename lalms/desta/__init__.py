"""DeSTA2.5-Audio (DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B), assembled from transformers parts.

The model (kehanlu/DeSTA2.5-Audio, `desta/models/modeling_desta25.py`) is a Whisper model, a
Q-Former connector and a Llama-3.1 LLM: the connector reads tapped layers of Whisper's encoder
and gives `prompt_size` vectors per clip, which take the placeholder positions of the clip's
audio locator in the prompt; Whisper's decoder transcribes the clip, and the transcript's tokens
follow those positions. The `desta` package is not needed.

- `config`: the release's config.json (`DeSTAConfig`), the tapped layers, the layout's constants;
- `modules`: the `nn` modules (`QformerConnector`, `WhisperPerception`, `DeSTA25Model`);
- `transcriber`: Whisper's transcripts with the voice-activity detector, and their cache;
- `release`: the release folder, the connector's weights and the tokenizers as upstream uses them;
- `adapter`: `DeSTA25`, the LALM (loading, saving, prompts, batches).
"""

from lalms.desta.adapter import DeSTA25
from lalms.desta.config import (
    CONFIG,
    CONNECTOR,
    LLAMA31_TEMPLATE,
    PERCEPTION_DTYPE,
    WEIGHTS,
    DeSTAConfig,
    tapped_layers,
)
from lalms.desta.modules import DeSTA25Model, QformerConnector, WhisperPerception
from lalms.desta.release import LLAMA_PAD, load_connector
from lalms.desta.transcriber import NO_SPEECH, VADS, Transcriber

__all__ = [
    "CONFIG",
    "CONNECTOR",
    "LLAMA31_TEMPLATE",
    "LLAMA_PAD",
    "NO_SPEECH",
    "PERCEPTION_DTYPE",
    "VADS",
    "WEIGHTS",
    "DeSTA25",
    "DeSTA25Model",
    "DeSTAConfig",
    "QformerConnector",
    "Transcriber",
    "WhisperPerception",
    "load_connector",
    "tapped_layers",
]

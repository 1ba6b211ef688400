"""LALM adapters: one interface (`LALM`) over Qwen2-Audio, Audio Flamingo 3 and DeSTA2.5-Audio."""

from common.prompt import Prompt, Turn
from lalms.audio_flamingo3 import AudioFlamingo3
from lalms.base import LALM, answer_nll
from lalms.desta import DeSTA25
from lalms.edit_sites import EditSites
from lalms.loading import ModelNotAvailableError
from lalms.processor_based import ProcessorLALM
from lalms.qwen2_audio import Qwen2Audio

# Families by the name the tiny builder's CLI takes.
FAMILIES: dict[str, type[LALM]] = {
    "qwen2_audio": Qwen2Audio,
    "audio_flamingo3": AudioFlamingo3,
    "desta": DeSTA25,
}

__all__ = [
    "LALM",
    "AudioFlamingo3",
    "DeSTA25",
    "EditSites",
    "FAMILIES",
    "ModelNotAvailableError",
    "ProcessorLALM",
    "Prompt",
    "Qwen2Audio",
    "Turn",
    "answer_nll",
]

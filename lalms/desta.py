"""DeSTA2.5-Audio (DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B) through its own `desta` package.

The package is not on PyPI: install it from its repository (see INSTALL). Its model assembles a
Llama-3.1 LLM and a Whisper encoder with a Q-Former connector and takes audio as file paths, so
this adapter writes clips to a temporary folder for generation. Edit sites are probed like any
other model (LLM layers `llm_model.model.layers`, connector `perception.connector`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from lalms.audio import check_audio
from lalms.base import LALM
from lalms.edit_sites import EditSites
from lalms.loading import resolve_device, resolve_dtype
from lalms.prompt import Prompt

INSTALL = (
    "DeSTA2.5-Audio needs the `desta` package, which is not on PyPI: "
    "`git clone https://github.com/kehanlu/DeSTA2.5-Audio && pip install -e DeSTA2.5-Audio` "
    "(its Llama-3.1 and Whisper checkpoints must then be reachable or cached)"
)
DEFAULT_SYSTEM_PROMPT = "Focus on the audio clips and instructions."


class DeSTA25(LALM):
    audio_token = "<|AUDIO|>"
    sampling_rate = 16000

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        edit_sites: Mapping[str, str] | None = None,
        max_new_tokens: int = 32,
        chat_template: str | None = None,
    ) -> None:
        if chat_template is not None:
            raise ValueError(
                "DeSTA2.5 renders prompts with its own Llama-3.1 template; unset model.chat_template"
            )
        self.model = model.eval()
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.edit_sites = EditSites.probe(model, edit_sites)

    @classmethod
    def load(
        cls,
        path: str,
        *,
        dtype: str = "bfloat16",
        device: str = "auto",
        random_init: bool = False,
        arch: Mapping[str, Any] | None = None,
        processor_path: str | None = None,
        **adapter_kwargs: Any,
    ) -> DeSTA25:
        try:
            from desta import DeSTA25AudioModel
        except ImportError as err:
            raise ImportError(INSTALL) from err
        if random_init:
            raise ValueError(
                "model.random_init is not available for DeSTA2.5: the desta package assembles the model "
                "from the Llama-3.1 and Whisper checkpoints"
            )
        model = DeSTA25AudioModel.from_pretrained(path)
        return cls(model.to(resolve_device(device), resolve_dtype(dtype)), **adapter_kwargs)

    def conversation(self, prompt: Prompt, clip_paths: list[str]) -> list[dict]:
        """The prompt in desta's message format, one `<|AUDIO|>` per clip."""
        system = prompt.system if prompt.system is not None else self.system_prompt
        msgs: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        clips = iter(clip_paths)
        for i, turn in enumerate(prompt.turns):
            if turn.audio is None:
                msgs.append({"role": "user", "content": turn.question})
            else:
                msgs.append(
                    {
                        "role": "user",
                        "content": f"{self.audio_token}\n{turn.question}",
                        "audios": [{"audio": next(clips), "text": None}],
                    }
                )
            if i < len(prompt.history):
                msgs.append({"role": "assistant", "content": turn.answer})
        return msgs

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="desta-") as tmp:
            conversations = []
            for p, prompt in enumerate(prompts):
                paths = []
                for t, turn in enumerate(prompt.turns):
                    if turn.audio is not None:
                        wave = check_audio(
                            turn.audio, turn.sampling_rate, self.sampling_rate, f"prompt {p} audio"
                        )
                        path = str(Path(tmp) / f"{p}-{t}.wav")
                        sf.write(path, wave, self.sampling_rate)
                        paths.append(path)
                conversations.append(self.conversation(prompt, paths))
            out = self.model.generate(
                messages=conversations, do_sample=False, max_new_tokens=max_new_tokens or self.max_new_tokens
            )
        return [text.strip() for text in out.text]

    def encode(self, prompts, answers=None):
        raise NotImplementedError(
            "DeSTA2.5: batching for teacher-forced losses is not supported yet (its inputs are built inside "
            "the desta package); generation and edit sites work"
        )

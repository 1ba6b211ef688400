"""I-IKE: instruction-based in-context editing. No weight changes: the edit is a natural-language
instruction added to the system prompt of every question the edited model is asked.

The instruction is a template (config data) filled with the attribute's wording, the original
label and the target, e.g. "Update to how you perceive speakers' emotions: what you would have
perceived as sad must from now on be perceived as happy." Sequential edits add one instruction
each, oldest first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from editors.base import ContextEdit, EditRequest
from lalms.base import LALM
from lalms.prompt import Prompt

DEFAULT_INSTRUCTION = (
    "Update to how you perceive {what}: what you would have perceived as {original} must from now on "
    "be perceived as {target}. Answer every question accordingly."
)
DEFAULT_WHAT = {
    "gender": "speakers' gender",
    "emotion": "speakers' emotions",
    "language": "spoken languages",
    "animal": "animal sounds",
}


class InstructionIKE:
    def __init__(
        self,
        lalm: LALM,
        instruction: str = DEFAULT_INSTRUCTION,
        what: Mapping[str, str] | None = None,
        base_system: str | None = "You are a helpful assistant.",
    ) -> None:
        self.lalm, self.template, self.base_system = lalm, instruction, base_system
        self.what = dict(what or DEFAULT_WHAT)

    def instruction(self, request: EditRequest) -> str:
        if request.attribute not in self.what:
            raise ValueError(
                f"no wording for attribute {request.attribute!r}: add it to editor.editor.what "
                f"(has {sorted(self.what)})"
            )
        return self.template.format(
            what=self.what[request.attribute], original=request.original, target=request.target
        )

    def system(self, prompt: Prompt, instruction: str) -> str:
        """The prompt's system turn with `instruction` appended. Without one, the model config's
        `system_prompt`, else `base_system` (the text chat templates insert by default)."""
        base = next(
            (s for s in (prompt.system, self.lalm.system_prompt, self.base_system) if s is not None), None
        )
        return f"{base}\n{instruction}" if base else instruction

    def apply(self, request: EditRequest) -> ContextEdit:
        text = self.instruction(request)
        return ContextEdit(lambda p: replace(p, system=self.system(p, text)))

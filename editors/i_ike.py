"""I-IKE: instruction-based in-context editing. No weight changes: the edit is a natural-language
instruction added to the system prompt of every question the edited model is asked.

The instruction is a template (config data) filled with the attribute's wording, the original
label and the target, e.g. "Update to how you perceive speakers' emotions: what you would have
perceived as sad must from now on be perceived as happy." Sequential edits add one instruction
each, oldest first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from common import EditRequest, TrainPool
from common.prompt import Prompt
from editors.base import BatchEdit, ContextHandle, context_rows
from lalms.base import LALM
from lalms.rows import RowsMemory


@dataclass(frozen=True)
class IIKEHParams:
    instruction: str  # a template with {what}, {original} and {target}
    what: Mapping[str, str]  # per attribute, how the instruction names it
    base_system: str | None  # the system text when neither the prompt nor the model config has one


class IIKE:
    HParams = IIKEHParams

    def __init__(self, lalm: LALM, hp: IIKEHParams, pool: TrainPool) -> None:
        self.lalm, self.hp = lalm, hp

    def instruction(self, request: EditRequest) -> str:
        what = self.hp.what
        if request.attribute not in what:
            raise ValueError(
                f"no wording for attribute {request.attribute!r}: add it to editor.hparams.what "
                f"(has {sorted(what)})"
            )
        return self.hp.instruction.format(
            what=what[request.attribute], original=request.original, target=request.target
        )

    def system(self, prompt: Prompt, instruction: str) -> str:
        """The prompt's system turn with `instruction` appended. Without one, the model config's
        `system_prompt`, else `base_system` (the text chat templates insert by default)."""
        base = next(
            (s for s in (prompt.system, self.lalm.system_prompt, self.hp.base_system) if s is not None), None
        )
        return f"{base}\n{instruction}" if base else instruction

    def apply(self, request: EditRequest) -> ContextHandle:
        text = self.instruction(request)
        return ContextHandle(lambda p: replace(p, system=self.system(p, text)))

    def apply_rows(self, requests: Sequence[EditRequest]) -> BatchEdit:
        """The K requests at once: each row's prompt carries its own edits' context."""
        return context_rows(self, self.lalm, requests)

    def rows_memory(self, tokens: int) -> RowsMemory:
        """Nothing per edit but its prompt context (the rows are longer, not more)."""
        return RowsMemory(per_edit=0)

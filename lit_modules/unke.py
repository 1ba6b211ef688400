"""Calibrating UnKE's stage 1 (the key search) on the train split, and caching its preserved keys.

For each train edit and each candidate learning rate, stage 1 runs for at most `max_steps` with a
loose norm bound (`max_clamp`) and stops at the first step whose delta makes greedy decoding give
the target; the record is that step and |delta| / |h| then (or unsolved). The rule's values:
- target.lr: the candidate that solves the most edits (ties: the fewest steps at the median);
- target.steps: `margin` times the steps that a `coverage` share of its solved edits needed, so
  that the target state lies past the decision boundary, not on it (stage 2 only approximates
  it);
- target.clamp_norm: `margin` times the |delta| / |h| that a `coverage` share of them needed.
Stage 1 alone is not the goal: what counts is the edit after stage 2, which only approximates
the target state. So on the validation split each edit is made end to end (stage 1 + 2) under
the rule's values and under the config's, and scored by whether greedy decoding then gives the
target on the edit prompt (reliability) and on its generality queries;
the exported values are those with the higher reliability (ties: generality, then the config's,
so that a calibration replaces the published settings only when it beats them). Without a
validation split the rule's values are exported unchecked. The export holds the preserved keys
(the block's recorded call and original outputs on the preservation inputs), so no evaluation
recomputes them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datamodules.examples import EditExample
from editors.unke import TargetSearch
from lit_modules.calibration import CalibrationModule, edit_key

SETTINGS = ("lr", "steps", "clamp_norm")  # what the calibration sets, of the hparams' `target`


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class KeySearchCalibration:
    """How UnKE's stage 1 is calibrated: the module's `hp` (configs/editor/unke.yaml's `module`)."""

    key_lrs: tuple[float, ...]
    """Adam learning rates of the delta tried on every train edit (non-empty)."""
    max_steps: int
    """Each search's step budget; it stops at the first step whose delta makes greedy decoding
    give the target."""
    max_clamp: float
    """The loose norm bound of those searches (|delta| <= max_clamp * |h|), and the largest
    clamp_norm the rule may choose."""
    coverage: float
    """In (0, 1]: the share of the best rate's solved edits whose steps and |delta| / |h| the
    rule covers ..."""
    margin: float
    """... times this (>= 1), so that the target lies past the decision boundary."""

    def __post_init__(self) -> None:
        if not self.key_lrs or not 0 < self.coverage <= 1 or self.margin < 1:
            raise ValueError(f"UnKE calibration: key_lrs non-empty, coverage in (0, 1], margin >= 1; got "
                             f"{list(self.key_lrs)}, {self.coverage}, {self.margin}")  # fmt: skip


class UnKECalibration(CalibrationModule):
    HParams = KeySearchCalibration
    hp: KeySearchCalibration
    _unke: Any = None  # the config's editor, built on first use
    _editors: dict[tuple, Any] | None = None  # UnKEs under other stage-1 settings, built on first use

    def unke(self) -> Any:
        """The editor of the config: its stage 1 runs the train search, its preserved keys are
        computed once and shared with the validation's editors."""
        if self._unke is None:
            self._unke = self.build()
        return self._unke

    def compared(self) -> dict[str, dict[str, Any]]:
        """The stage-1 settings validation compares (of the hparams' `target`): the rule's and
        the config's."""
        config = self.editor_hparams["target"]
        return {"calibrated": dict(self.summary["rule"]), "config": {k: config[k] for k in SETTINGS}}

    def editor(self, settings: dict[str, Any]) -> Any:
        """An UnKE under `settings`, sharing the config editor's preserved keys."""
        key = tuple(sorted(settings.items()))
        if self._editors is None:
            self._editors = {}
        if key not in self._editors:
            self._editors[key] = self.build({"target": settings})
            self._editors[key].load_state_dict(self.unke().state_dict())
        return self._editors[key]

    def _search(self, example: EditExample, lr: float) -> tuple[int | None, float | None]:
        """(first solved step, |delta|/|h| then) of stage 1 on the example's edit at rate `lr`."""
        unke = self.unke()
        batch, pos = unke.edit_batch(example.edit.prompt, example.instance.target)
        search = TargetSearch(lr, self.hp.max_steps, unke.hp.target.weight_decay, self.hp.max_clamp)
        _, _, trace = unke.target_state(batch, pos, search, until_solved=True)
        return trace.solved_at, trace.norm

    def record(self, examples: Sequence[EditExample], split: str) -> list[dict[str, Any]]:
        out = []
        for ex in examples:
            if split == "train":
                for lr in self.hp.key_lrs:
                    solved, norm = self._search(ex, lr)
                    out.append({"edit": edit_key(ex), "key_lr": lr, "solved_at": solved, "norm": norm})
                continue
            target = ex.instance.target
            for setting, values in self.compared().items():  # stage 1 + 2, end to end
                snapshot = self.editor(values).apply(ex.request())
                try:
                    reliable = bool(self.answers([ex.edit.prompt], target)[0])
                    general = self.answers([g.prompt for g in ex.generality], target).float().mean()
                finally:
                    snapshot.undo()
                out.append({"edit": edit_key(ex), "setting": setting, "reliable": reliable,
                            "general": round(float(general), 4)})  # fmt: skip
        return out

    def step_logs(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {
            f"solved/lr{lr:g}": sum(r["solved_at"] is not None for r in records if r["key_lr"] == lr)
            / max(1, sum(r["key_lr"] == lr for r in records))
            for lr in self.hp.key_lrs
        }

    def choose(self, train: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        hp, per = self.hp, []
        for lr in hp.key_lrs:
            rows = [r for r in train if r["key_lr"] == lr]
            solved = [r for r in rows if r["solved_at"] is not None]
            steps = [r["solved_at"] for r in solved]
            norms = [r["norm"] for r in solved]
            per.append({
                "key_lr": lr,
                "solved": round(len(solved) / len(rows), 4),
                "median_steps": statistics.median(steps) if steps else None,
                "steps_at_coverage": quantile(steps, hp.coverage) if steps else None,
                "norm_at_coverage": round(quantile(norms, hp.coverage), 4) if norms else None,
            })  # fmt: skip
        best = max(per, key=lambda p: (p["solved"], -(p["median_steps"] or math.inf)))
        if best["steps_at_coverage"] is None:
            raise RuntimeError(
                f"UnKE calibration: stage 1 solved none of {len(train) // len(hp.key_lrs)} train edits with "
                f"learning rates {list(hp.key_lrs)} in {hp.max_steps} steps; widen key_lrs or max_steps"
            )
        rule = {
            "lr": best["key_lr"],
            "steps": min(hp.max_steps, max(1, math.ceil(hp.margin * (best["steps_at_coverage"] + 1)))),
            "clamp_norm": round(min(hp.max_clamp, hp.margin * best["norm_at_coverage"]), 4),
        }
        summary = {"candidates": per, "coverage": hp.coverage, "margin": hp.margin, "rule": dict(rule)}
        return {"target": rule}, summary

    def score(self, val: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
        """End-to-end reliability and generality of each compared setting; the better is chosen."""
        figures: dict[str, float] = {}
        for setting in self.compared():
            rows = [r for r in val if r["setting"] == setting]
            figures[f"{setting}/reliability"] = round(sum(r["reliable"] for r in rows) / len(rows), 4)
            figures[f"{setting}/generality"] = round(sum(r["general"] for r in rows) / len(rows), 4)
        winner = max(
            self.compared(),
            key=lambda s: (figures[f"{s}/reliability"], figures[f"{s}/generality"], s == "config"),
        )
        self.summary["validated"] = winner
        return {**figures, "kept_config": float(winner == "config")}, {"target": self.compared()[winner]}

    def exported_editor(self) -> Any:
        return self.unke()

"""Calibrating WISE on the train split: the routing threshold (act_ratio) and the margins.

For each train edit and each candidate margin setting (alpha, beta, gamma), the edit is written
into the side memory and the activation distance d of every query of the instance is taken
relative to the edit prompt's own, r = d / d_edit: the generality queries (the paraphrase and
the other clips of the edited label) should be routed to the side memory (r > act_ratio), the
locality queries (other clips, text questions) should not. Per candidate, act_ratio is the
threshold below 1 (the edit prompt itself must be routed) with the best balanced accuracy on the
train ratios; on the validation split every candidate is run again and scored with its
threshold: routing balanced accuracy times edit success (the edit prompt answered with the
target). The best candidate's margins and act_ratio are exported with the preservation
activations; TensorBoard gets the per-candidate figures and histograms of the ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.hparams import to_dict
from datamodules.examples import EditExample
from editors.wise import Margins
from lit_modules.calibration import CalibrationModule, best_threshold, edit_key

MARGINS = ("alpha", "beta", "gamma")


@dataclass(frozen=True)
class WISECalibrationHParams:
    """What WISE's calibration tries: the module's `hp` (configs/editor/wise.yaml's `module`)."""

    candidates: tuple[Margins, ...]
    """Margin settings (alpha, beta, gamma) tried, act_ratio fitted for each; empty: the
    config's own margins (editor.hparams.margins) alone."""


class WISECalibration(CalibrationModule):
    HParams = WISECalibrationHParams
    hp: WISECalibrationHParams
    _editors: list[Any] | None = None  # built on first use

    @property
    def candidates(self) -> list[dict[str, float]]:
        """The margin settings tried, as plain mappings nested like WISE's `margins`."""
        return [to_dict(c) for c in self.hp.candidates] or [dict(self.editor_hparams["margins"])]

    def editors(self) -> list[Any]:
        """One WISE per candidate, sharing the preservation activations (computed once)."""
        if self._editors is None:
            self._editors = [self.build({"margins": c}) for c in self.candidates]
            shared = self._editors[0].state_dict()
            for wise in self._editors[1:]:
                wise.load_state_dict(shared)
        return self._editors

    def record(self, examples: Sequence[EditExample], split: str) -> list[dict[str, Any]]:
        out = []
        for ex in examples:
            inside = [g.prompt for g in ex.generality]
            outside = [q.prompt for q in ex.locality]
            request = ex.request()
            for c, wise in enumerate(self.editors()):
                handle = wise.apply(request)
                try:
                    d = wise.distances([ex.edit.prompt, *inside, *outside])
                    r = (d / d[0].clamp(min=1e-12)).tolist()
                    success = bool(self.answers([ex.edit.prompt], request.target)[0])
                finally:
                    handle.undo()
                out.append(
                    {"edit": edit_key(ex), "candidate": c, "success": success,
                     "inside": r[1 : 1 + len(inside)], "outside": r[1 + len(inside) :]}
                )  # fmt: skip
        return out

    def step_logs(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {"edit_success": sum(r["success"] for r in records) / len(records)}

    @staticmethod
    def _ratios(records: list[dict[str, Any]], c: int, key: str) -> torch.Tensor:
        return torch.tensor([x for r in records if r["candidate"] == c for x in r[key]], dtype=torch.double)

    def choose(self, train: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        per = []
        for c, margins in enumerate(self.candidates):
            act_ratio, balanced = best_threshold(
                self._ratios(train, c, "inside"), self._ratios(train, c, "outside")
            )
            success = [r["success"] for r in train if r["candidate"] == c]
            per.append({**margins, "act_ratio": round(act_ratio, 4), "train_routing": round(balanced, 4),
                        "train_success": round(sum(success) / len(success), 4)})  # fmt: skip
        self._per_candidate = per
        return self._pick(per, "train"), {"candidates": per}

    @staticmethod
    def _pick(per: list[dict[str, Any]], split: str) -> dict[str, Any]:
        """The chosen values, nested like WISE's hparams."""
        best = max(per, key=lambda p: p[f"{split}_routing"] * p[f"{split}_success"])
        return {"margins": {k: best[k] for k in MARGINS}, "act_ratio": best["act_ratio"]}

    def score(self, val: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
        """Every candidate under its train threshold on the held-out edits; the best is chosen."""
        figures = {}
        for c, p in enumerate(self._per_candidate):
            inside, outside = self._ratios(val, c, "inside"), self._ratios(val, c, "outside")
            success = [r["success"] for r in val if r["candidate"] == c]
            routed = (inside > p["act_ratio"]).double().mean() + (outside <= p["act_ratio"]).double().mean()
            p["val_routing"] = round(float(routed / 2), 4)
            p["val_success"] = round(sum(success) / len(success), 4)
            figures |= {f"candidate{c}/routing": p["val_routing"], f"candidate{c}/success": p["val_success"]}
            self._histograms(c, inside, outside)
        chosen = self._pick(self._per_candidate, "val")
        best = next(
            p for p in self._per_candidate
            if p["act_ratio"] == chosen["act_ratio"] and all(p[k] == v for k, v in chosen["margins"].items())
        )  # fmt: skip
        figures |= {
            "routing": best["val_routing"],
            "success": best["val_success"],
            "act_ratio": best["act_ratio"],
        }
        return figures, chosen

    def _histograms(self, c: int, inside: torch.Tensor, outside: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            experiment.add_histogram(f"wise/candidate{c}/in_scope_ratio", inside, self.global_step)
            experiment.add_histogram(f"wise/candidate{c}/out_of_scope_ratio", outside, self.global_step)

    def exported_editor(self) -> Any:
        return self.editors()[0]  # the preservation activations do not depend on the settings

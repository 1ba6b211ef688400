"""Editing methods, one file each, with one shape: `Method(lalm, hp, pool)` (editors/base.py)."""

from editors.base import ContextHandle, EditHandle, Editor, WeightSnapshot

__all__ = ["ContextHandle", "EditHandle", "Editor", "WeightSnapshot"]

"""Editing methods, one file each, behind the `Editor` protocol (editors/base.py)."""

from editors.base import EditHandle, Editor, EditRequest, WeightSnapshot

__all__ = ["EditHandle", "EditRequest", "Editor", "WeightSnapshot"]

"""Exact restoration of the parameters an edit touched."""

import pytest
import torch

from editors import WeightSnapshot


def test_snapshot_restores_touched_parameters_bitwise(lalm):
    names = [n for n, _ in lalm.model.named_parameters() if ".mlp." in n][:3]
    before = {n: p.detach().clone() for n, p in lalm.model.named_parameters()}
    snap = WeightSnapshot(lalm.model, names)
    with torch.no_grad():
        for n, p in lalm.model.named_parameters():
            if n in names:
                p.add_(torch.randn_like(p))
    assert any(not torch.equal(p, before[n]) for n, p in lalm.model.named_parameters())
    snap.undo()
    assert all(torch.equal(p, before[n]) for n, p in lalm.model.named_parameters())
    with pytest.raises(RuntimeError, match="already undone"):
        snap.undo()


def test_snapshot_rejects_unknown_parameters(lalm):
    with pytest.raises(KeyError, match="no parameters"):
        WeightSnapshot(lalm.model, ["not.a.parameter"])

"""MEND's core: identity at initialisation, running statistics, exact undo."""

import pytest
import torch

from editors.base import EditRequest
from editors.mend import MEND, MENDEditor, RunningNorm
from lalms import Prompt

SITES = [f"llm.layers.{i}.mlp.{p}" for i in (-3, -2, -1) for p in ("gate_proj", "up_proj", "down_proj")]


def test_running_norm_matches_full_batch_statistics():
    torch.manual_seed(0)
    data = torch.randn(500, 6) * 3 + 1
    norm = RunningNorm(6)
    for chunk in data.split([7, 100, 1, 250, 142]):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean.float(), data.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close((norm.m2 / (norm.count - 1)).float(), data.var(0), atol=1e-4, rtol=1e-5)
    z = norm(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-4, rtol=0)


def test_an_untrained_mend_takes_a_plain_gradient_step(lalm, clips):
    mend = MEND(lalm, SITES, edit_lr=1e-3)
    assert len(mend.transforms) == 2  # gate/up share one shape, down another
    prompt, target = Prompt("Which animal?", audio=clips[0]), "dog"
    new = mend.new_params(mend.capture([prompt], [target]))
    params = dict(lalm.model.named_parameters())
    names = list(new)
    weights = [params[n] for n in names]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(lalm.loss([prompt], [target]), weights)
    for w in weights:
        w.requires_grad_(False)
    for n, w, g in zip(names, weights, grads, strict=True):
        torch.testing.assert_close(new[n], w - 1e-3 * g, atol=1e-6, rtol=1e-4)


def test_a_gradient_step_lowers_the_edit_loss_and_undo_is_exact(lalm, clips):
    mend = MEND(lalm, SITES, edit_lr=0.05)
    request = EditRequest(
        Prompt("Which animal?", audio=clips[0]), target="cat", original="dog", attribute="animal"
    )
    before = {n: p.detach().clone() for n, p in lalm.model.named_parameters()}
    loss_before = lalm.loss([request.prompt], [request.target]).item()
    handle = MENDEditor(mend).apply(request)
    assert lalm.loss([request.prompt], [request.target]).item() < loss_before
    changed = {n for n, p in lalm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(mend.param_names)
    handle.undo()
    assert all(torch.equal(p, before[n]) for n, p in lalm.model.named_parameters())


def test_mend_state_excludes_the_base_model(lalm):
    state = MEND(lalm, SITES).state_dict()
    assert not any(k.startswith("model.") or "language_model" in k for k in state)
    assert "edit_lrs" in state and any(k.startswith("x_norms.") for k in state)


def test_mend_refuses_non_linear_sites(lalm):
    with pytest.raises(TypeError, match="linear layers"):
        MEND(lalm, ["llm.layers.-1"])

"""MEND and KE, built from the configs train.py composes: the update rules, batched edits equal
to functional_call, exact undo."""

import pytest
import torch

from common import EditRequest
from common.hparams import HParamsError
from editors.hypernet import HypernetEditor, LowRankDelta
from editors.mend import RunningStats
from lalms import Prompt
from tests.helpers import configured

SMALL_KE = ("editor.hparams.lstm_dim=8", "editor.hparams.condition_dim=16", "editor.hparams.hidden_dim=8")


def MEND(lalm, *overrides):
    return configured("mend", lalm, None, *overrides)


def KE(lalm, *overrides):
    return configured("ke", lalm, None, *SMALL_KE, "editor.hparams.zero_shift=false", *overrides)


def request(clip, target="cat", question="Which animal?"):
    return EditRequest(Prompt(question, audio=clip), target=target, original="dog", attribute="animal")


def weight_grads(lalm, names, prompt, target):
    params = dict(lalm.model.named_parameters())
    weights = [params[n] for n in names]
    for w in weights:
        w.requires_grad_(True)
    try:
        return torch.autograd.grad(lalm.loss([prompt], [target]), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)


def test_running_statistics_merged_in_chunks_equal_the_full_batch_ones():
    torch.manual_seed(0)
    x, delta = torch.randn(500, 6) * 3 + 1, torch.randn(500, 4) * 1e-4 - 2e-4
    stats = RunningStats(6, 4)
    for a, b in zip(x.split([7, 100, 1, 250, 142]), delta.split([7, 100, 1, 250, 142]), strict=True):
        stats.update(a, b)
    assert int(stats.count) == 500
    torch.testing.assert_close(stats.x_mean.float(), x.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.delta_mean.float(), delta.mean(0), atol=1e-9, rtol=1e-5)
    x_std, delta_std = stats.std()
    torch.testing.assert_close(x_std.float(), x.std(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_std.float(), delta.std(0), atol=1e-10, rtol=1e-5)
    xn, dn = stats.normalise(x, delta)  # gradient-sized deltas come out unit-sized too
    torch.testing.assert_close(dn.std(0), torch.ones(4), atol=2e-3, rtol=0)  # std 1e-4 + eps 1e-7
    torch.testing.assert_close(xn.mean(0), torch.zeros(6), atol=1e-4, rtol=0)


def test_an_untrained_mend_takes_a_plain_gradient_step(lalm, clips):
    mend = MEND(lalm, "editor.hparams.edit_lr=1e-3").eval()
    assert len(mend.param_names) == 9  # gate/up/down of the last three layers
    assert len(mend.mend.networks) == 2  # gate/up share one shape, down another (shared: true)
    req = request(clips[0])
    new = mend.edit_params(req)
    grads = weight_grads(lalm, list(new), req.prompt, req.target)
    params = dict(lalm.model.named_parameters())
    for (name, value), g in zip(new.items(), grads, strict=True):
        torch.testing.assert_close(value, params[name] - 1e-3 * g, atol=1e-6, rtol=1e-4)


def ke_condition(ke, req):
    """The condition KE computes for `req`: from the edit query's own tokens."""
    (cap,), _ = ke.capture(ke.lalm.encode([req.prompt], [req.target]), [0])
    return ke.learner.condition([cap.tokens])


def test_ke_update_is_the_elementwise_rule_on_the_true_gradient(lalm, clips):
    torch.manual_seed(0)
    ke = KE(lalm, "editor.hparams.layers=[-1]", "editor.hparams.max_scale=0.1").eval()
    req = request(clips[1])
    new = ke.edit_params(req)
    grads = weight_grads(lalm, ke.param_names, req.prompt, req.target)
    cond = ke_condition(ke, req)
    params = dict(lalm.model.named_parameters())
    for name, update, g in zip(ke.param_names, ke.learner.updates, grads, strict=True):
        c_a, r_a, c_b, r_b, eta = (t[0] for t in update(cond))
        a = torch.outer(r_a.softmax(-1), c_a)
        b = torch.outer(r_b.softmax(-1), c_b)
        expected = params[name] + 0.1 * torch.sigmoid(eta) * (a * g + b)
        torch.testing.assert_close(new[name], expected, atol=1e-6, rtol=1e-4)


def test_ke_conditions_on_the_edit_query_tokens(lalm, clips):
    """The condition is the edit row's prompt and answer tokens, without padding."""
    ke = KE(lalm).eval()
    reqs = [request(clips[0], "cat"), request(clips[1], "a very long answer", "Name the animal.")]
    batch = lalm.encode([r.prompt for r in reqs], [r.target for r in reqs])
    captured, _ = ke.capture(batch, [0, 1])
    for row, cap in enumerate(captured):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert torch.equal(cap.tokens.cpu(), ids.cpu())
    alone, _ = ke.capture(lalm.encode([reqs[0].prompt], [reqs[0].target]), [0])
    assert torch.equal(alone[0].tokens, captured[0].tokens)


@pytest.mark.parametrize("kind", ["mend", "ke"])
def test_batched_row_edits_equal_functional_call_per_edit(lalm, clips, kind):
    torch.manual_seed(0)
    net = (
        MEND(lalm, "editor.hparams.edit_lr=0.5")
        if kind == "mend"
        else KE(lalm, "editor.hparams.max_scale=50.0")
    )
    net.eval()
    reqs = [request(clips[0], "cat"), request(clips[1], "frog", "Name the animal.")]
    batch = lalm.encode([r.prompt for r in reqs], [r.target for r in reqs])
    captured, _ = net.capture(batch, [0, 1])
    deltas = net.deltas(captured)
    # Each edit's rows: its own prompt plus a shared query, so rows of one edit sit apart.
    queries = [reqs[0].prompt, reqs[1].prompt, Prompt("Is it loud?", audio=clips[0]), Prompt("Is it loud?")]
    answers = ["cat", "frog", "yes", "no"]
    groups = [[0, 2], [1, 3]]
    enc = lalm.encode(queries, answers)
    with torch.no_grad(), net.row_edits(deltas, groups):
        batched = lalm.logits(enc)
    with torch.no_grad():
        assert (batched - lalm.logits(enc)).abs().max() > 1e-3  # the edits do change the answers
    params = dict(lalm.model.named_parameters())
    for b, rows in enumerate(groups):
        edited = {n: params[n] + d.dense() for n, d in zip(net.param_names, deltas[b], strict=True)}
        alone = lalm.encode([queries[r] for r in rows], [answers[r] for r in rows])
        with torch.no_grad():
            single = lalm.logits(alone, params=edited)
        for k, r in enumerate(rows):
            got = batched[r][enc["attention_mask"][r].bool()]
            torch.testing.assert_close(
                got, single[k][alone["attention_mask"][k].bool()], atol=1e-4, rtol=1e-4
            )


def test_capture_keeps_edits_apart_in_a_batch(lalm, clips):
    net = MEND(lalm).eval()
    reqs = [request(clips[0], "cat"), request(clips[1], "frog", "Name the animal.")]
    both, _ = net.capture(lalm.encode([r.prompt for r in reqs], [r.target for r in reqs]), [0, 1])
    for b, req in enumerate(reqs):
        (alone,), _ = net.capture(lalm.encode([req.prompt], [req.target]), [0])
        assert torch.equal(both[b].tokens, alone.tokens)
        for c_both, c_alone in zip(both[b].layers, alone.layers, strict=True):
            torch.testing.assert_close(c_both.x, c_alone.x, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(c_both.delta, c_alone.delta, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mend", "ke"])
def test_an_edit_lowers_the_edit_loss_and_undo_is_exact(lalm, clips, kind):
    torch.manual_seed(0)
    net = (
        MEND(lalm, "editor.hparams.edit_lr=0.05")
        if kind == "mend"
        else KE(lalm, "editor.hparams.max_scale=1e-3")
    )
    req = request(clips[0])
    before = {n: p.detach().clone() for n, p in lalm.model.named_parameters()}
    handle = HypernetEditor(net).apply(req)
    changed = {n for n, p in lalm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(net.param_names)
    if kind == "mend":  # an untrained MEND is a gradient step: the edit loss goes down
        after = lalm.loss([req.prompt], [req.target]).item()
        handle.undo()
        assert after < lalm.loss([req.prompt], [req.target]).item()
    else:
        handle.undo()
    assert all(torch.equal(p, before[n]) for n, p in lalm.model.named_parameters())


def test_hypernetwork_state_excludes_the_base_model(lalm):
    for net in (MEND(lalm, "editor.hparams.rank=4"), KE(lalm)):
        state = net.state_dict()
        assert not any("language_model" in k or "audio_tower" in k or k.startswith("model.") for k in state)
    state = MEND(lalm).state_dict()  # the learned steps and the running statistics travel with it
    assert "mend.edit_lrs" in state and any(k.endswith("stats.count") for k in state)


def test_edits_refuse_non_linear_sites_and_low_rank_delta_is_consistent(lalm):
    with pytest.raises(TypeError, match="linear layers"):
        MEND(lalm, "editor.hparams.projections=[act_fn]")
    for rank in (1, 3, 40):  # the factored path (few positions) and the dense one (many)
        d = LowRankDelta(torch.randn(rank, 5), torch.randn(rank, 4))
        x = torch.randn(2, 4)
        torch.testing.assert_close(d(x), x @ (d.left.T @ d.right).T, atol=1e-4, rtol=1e-4)


def test_capture_keeps_only_positions_with_an_input_and_a_gradient(lalm, clips):
    """As the reference MEND: a position without gradient never reaches the networks (after
    normalisation its zero would not be zero), nor one without input."""
    net = MEND(lalm).eval()
    req = request(clips[0])
    batch = lalm.encode([req.prompt], [req.target])
    (cap,), _ = net.capture(batch, [0])
    length = int(batch["attention_mask"][0].sum())
    for layer in cap.layers:
        assert (layer.x != 0).any(-1).all() and (layer.delta != 0).any(-1).all()
    # the top edited layer's gradient reaches the answer positions only
    assert 0 < len(cap.layers[-1].x) < length


def test_ke_zero_shift_starts_as_a_pure_rescaled_gradient(lalm, clips):
    torch.manual_seed(0)
    ke = KE(
        lalm, "editor.hparams.layers=[-1]", "editor.hparams.max_scale=0.1", "editor.hparams.zero_shift=true"
    )
    req = request(clips[1])
    cond = ke_condition(ke, req)
    for update in ke.learner.updates:
        c_a, _, c_b, r_b, _ = update(cond)
        assert torch.count_nonzero(r_b) == 0 and torch.count_nonzero(c_b) == 0
        assert torch.count_nonzero(c_a) > 0  # A keeps its random start
    grads = weight_grads(lalm, ke.param_names, req.prompt, req.target)
    params = dict(lalm.model.named_parameters())
    new = ke.edit_params(req)
    for name, update, g in zip(ke.param_names, ke.learner.updates, grads, strict=True):
        c_a, r_a, _, _, eta = (t[0] for t in update(cond))
        expected = params[name] + 0.1 * torch.sigmoid(eta) * torch.outer(r_a.softmax(-1), c_a) * g
        torch.testing.assert_close(new[name], expected, atol=1e-6, rtol=1e-4)


def test_a_config_that_does_not_fill_the_hparams_is_refused_naming_the_key(lalm):
    with pytest.raises(HParamsError, match=r"hparams\.rank must be int"):
        MEND(lalm, "editor.hparams.rank=wide")
    with pytest.raises(HParamsError, match=r"unknown hparams\.ranks"):
        MEND(lalm, "+editor.hparams.ranks=4")
    with pytest.raises(HParamsError, match=r"hparams\.rank missing"):
        MEND(lalm, "~editor.hparams.rank")

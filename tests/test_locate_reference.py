"""The reference implementations' forms (kmeng01/rome, jianghoucheng/AlphaEdit) that the
options of editors/locate.py, editors/rome.py and editors/alphaedit.py select, each pinned
against values computed by hand on tiny tensors, and the reference profiles
(configs/editor/{rome,alphaedit}_reference.yaml) editing the shipped tiny LALM."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from editors.alphaedit import AlphaEdit, null_directions
from editors.locate import ValueSearch, decay_term, kl_term, search_delta
from editors.rome import ROME
from evaluation.sweep import request
from tests.helpers import composed, configured

D, VOCAB, T = 4, 7, 5


class Toy:
    """A stand-in for an LALM: logits = head(tanh(site(x))); `site` is the searched module."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.site, self.head = torch.nn.Linear(D, D), torch.nn.Linear(D, VOCAB)
        for p in [*self.site.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)

    def logits(self, batch):
        return self.head(torch.tanh(self.site(batch["x"])))

    def by_hand(self, x, where, delta):
        """The logits with `delta` added to the site's output where `where` > 0."""
        return self.head(torch.tanh(self.site(x) + (where > 0).float()[..., None] * delta))


def toy_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, D, generator=g) * torch.tensor([3.0, 0.3])[:, None, None]  # rows of unlike norms
    labels = torch.full((2, T), -100)
    labels[:, 3:] = torch.tensor([2, 5])
    where = torch.zeros(2, T)
    where[:, 2] = 1.0  # the key position: the one that predicts the first answer token
    neutral = {"x": torch.randn(1, T, D, generator=g)}
    neutral_where = torch.zeros(1, T)
    neutral_where[0, -1] = 1.0
    return {"x": x, "labels": labels}, where, neutral, neutral_where


def search(**changes):
    base = ValueSearch(lr=0.1, steps=5, kl_weight=0.0, weight_decay=0.0, clamp_norm=100.0, scale="lookup",
                       decay="linear", kl="after_before", early_stop_loss=None)  # fmt: skip
    return replace(base, **changes)


def nll(logits, labels):
    """Per row the mean NLL of its answer tokens, then the mean over rows (compute_v.py:127-136)."""
    logp = logits[:, :-1].log_softmax(-1)
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (-(picked * mask).sum(1) / mask.sum(1)).mean()


# ----------------------------------------------------------------- the formulas
def test_the_linear_decay_is_the_norm_over_the_squared_scale():
    delta, s = torch.tensor([3.0, 4.0]), torch.tensor(2.0)  # |delta| = 5
    assert float(decay_term(delta, s, "linear")) == pytest.approx(5 / 4)  # compute_v.py:140-142
    assert float(decay_term(delta, s, "squared")) == pytest.approx((5 / 2) ** 2)  # this project's
    with pytest.raises(ValueError, match="decay"):
        decay_term(delta, s, "cubic")


def test_kl_after_before_is_the_references_kl_div_of_the_initial_and_current_distributions():
    before = torch.tensor([[0.9, 0.09, 0.01], [0.1, 0.1, 0.8]]).log()
    after = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]).log()
    by_hand = {  # sum_i p_i log(p_i / q_i), the batch mean
        "after_before": float((after.exp() * (after - before)).sum(-1).mean()),
        "before_after": float((before.exp() * (before - after)).sum(-1).mean()),
    }
    assert by_hand["after_before"] == pytest.approx(
        float(F.kl_div(before, after, log_target=True, reduction="batchmean"))  # compute_v.py:137-139
    )
    assert abs(by_hand["after_before"] - by_hand["before_after"]) > 0.05  # the directions differ here
    for direction, value in by_hand.items():
        assert float(kl_term(before, after, direction)) == pytest.approx(value, rel=1e-6)


def test_the_search_loss_is_nll_plus_linear_decay_over_h_init_plus_kl_after_before():
    """The loss the search records at step 1 (after one update) equals the reference's loss of
    that delta computed by hand: NLL + kl_factor * KL(after || before) + wd * |delta| / |h_init|^2."""
    toy, (batch, where, neutral, neutral_where) = Toy(), toy_batch()
    hp = search(lr=1.0, steps=1, kl_weight=0.5, weight_decay=2.0)
    first, _ = search_delta(toy, toy.site, batch, where, neutral, neutral_where, hp)
    _, trace = search_delta(toy, toy.site, batch, where, neutral, neutral_where, replace(hp, steps=2))
    h_init = toy.site(batch["x"])[0, 2]
    before = toy.logits(neutral)[:, -1].log_softmax(-1)
    after = toy.by_hand(neutral["x"], neutral_where, first)[:, -1].log_softmax(-1)
    kl = (after.exp() * (after - before)).sum(-1).mean()
    expected = nll(toy.by_hand(batch["x"], where, first), batch["labels"]) + 0.5 * kl
    expected = expected + 2.0 * first.norm() / h_init.norm() ** 2
    assert first.norm() > 0 and trace.losses[1] == pytest.approx(float(expected), rel=1e-5)
    wrong = (
        expected - 0.5 * kl + 0.5 * (before.exp() * (before - after)).sum(-1).mean()
    )  # KL(before || after)
    assert abs(float(wrong) - trace.losses[1]) > 1e-4


@pytest.mark.parametrize("scale", ["lookup", "layer"])
def test_the_clamp_is_clamp_norm_times_h_init_at_the_lookup_position(scale):
    """lookup: |delta| <= 0.75 |h_init|, the unedited output at the first row's key position
    (compute_v.py:84, 161-164); layer: 0.75 times the mean |h| over all positions (here)."""
    toy, (batch, where, _, _) = Toy(), toy_batch()
    delta, _ = search_delta(toy, toy.site, batch, where, None, None, search(lr=10.0, steps=1, clamp_norm=0.75,
                                                                             scale=scale))  # fmt: skip
    h = toy.site(batch["x"])
    h_init, mean = h[0, 2].norm(), h.norm(dim=-1).mean()
    assert abs(h_init - mean) > 0.1 * mean  # the two forms differ on this batch
    assert float(delta.norm()) == pytest.approx(
        float(0.75 * (h_init if scale == "lookup" else mean)), rel=1e-5
    )


def test_the_search_stops_before_the_update_once_the_loss_is_below_the_threshold():
    toy, (batch, where, _, _) = Toy(), toy_batch()
    hp = search(lr=0.3, steps=12)
    _, full = search_delta(toy, toy.site, batch, where, None, None, hp)
    losses = full.losses
    i = next(j for j, loss in enumerate(losses) if loss < losses[0] - 0.2)
    assert i >= 2  # the loss falls below the threshold after a few updates
    threshold = (losses[i] + min(losses[:i])) / 2  # above every loss before step i, below step i's
    stopped, trace = search_delta(
        toy, toy.site, batch, where, None, None, replace(hp, early_stop_loss=threshold)
    )
    after_i, _ = search_delta(toy, toy.site, batch, where, None, None, replace(hp, steps=i))
    assert trace.losses == pytest.approx(losses[: i + 1])  # stopped at step i ...
    assert torch.equal(stopped, after_i)  # ... before its update: i updates made
    at_once, trace = search_delta(toy, toy.site, batch, where, None, None, replace(hp, early_stop_loss=1e9))
    assert len(trace.losses) == 1 and not at_once.any()  # below at the start: no update at all


def test_the_absolute_null_space_selects_exactly_the_eigenvectors_below_the_threshold(monkeypatch):
    """absolute: eigenvalues (singular values) below 2e-2 itself (AlphaEdit experiments/evaluate.py:
    418-422); relative: below 2e-2 times the largest (here)."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.double))
    values = torch.tensor([1e-3, 1.5e-2, 2.5e-2, 0.5, 3.0], dtype=torch.double)
    moment = (q * values) @ q.T
    monkeypatch.setattr("editors.alphaedit.second_moment", lambda *args: moment.float())
    projections = {}
    for null_space, below in (("absolute", [0, 1]), ("relative", [0, 1, 2])):  # 2e-2 * 3.0 = 6e-2
        editor = AlphaEdit.__new__(AlphaEdit)
        editor.lalm = editor.pool = None
        editor.hp = SimpleNamespace(null_space=null_space, null_threshold=2e-2, corpus=None)
        editor._projections = {}
        projections[null_space] = editor.projection(SimpleNamespace(path="site")).double()
        assert torch.allclose(projections[null_space], q[:, below] @ q[:, below].T, atol=1e-5), null_space
    u, s, _ = torch.linalg.svd(moment)  # the reference's own construction
    assert torch.allclose(projections["absolute"], u[:, s < 2e-2] @ u[:, s < 2e-2].T, atol=1e-5)
    with pytest.raises(ValueError, match="null_space"):
        null_directions(values, "logarithmic", 2e-2)


def test_rome_regularisation_zero_is_the_plain_inverse(monkeypatch):
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.double))
    c = (q * torch.tensor([1e-3, 0.1, 1.0, 2.0, 3.0, 5.0], dtype=torch.double)) @ q.T  # mean diagonal 1.85
    k = q[:, 0] + q[:, 3]  # C^-1 k is mostly along the smallest eigenvalue's direction: a ridge shows
    monkeypatch.setattr("editors.rome.second_moment", lambda *args: c.float())
    solved = {}
    for regularisation in (0.0, 1e-4):
        rome = ROME.__new__(ROME)
        rome.lalm = rome.pool = None
        rome.hp = SimpleNamespace(regularisation=regularisation, corpus=None)
        rome._inverse = {}
        solved[regularisation] = rome.inverse_moment(SimpleNamespace(path="site")).double() @ k
    plain = torch.linalg.solve(c.float().double(), k)  # C^-1 k, no ridge (rome/compute_u.py:51-53)
    assert torch.allclose(solved[0.0], plain, rtol=1e-3)
    assert float(plain @ q[:, 0]) == pytest.approx(1e3, rel=1e-3)  # 1 / the smallest eigenvalue
    assert float(solved[1e-4] @ q[:, 0]) == pytest.approx(1 / (1e-3 + 1e-4 * 1.85), rel=1e-3)  # the ridge's


def test_unknown_search_forms_are_refused():
    for field in ("scale", "decay", "kl"):
        with pytest.raises(ValueError, match=field):
            search(**{field: "other"})


# ----------------------------------------------------------------- the profiles
def test_the_reference_profiles_compose_the_references_values():
    rome = composed("evaluate", "editor=rome_reference", "model=tiny").editor.hparams
    assert (rome.search.lr, rome.search.steps, rome.search.clamp_norm, rome.search.weight_decay) == (
        0.5,
        19,
        4.0,
        0.5,
    )
    assert (rome.search.scale, rome.search.decay, rome.search.kl, rome.search.early_stop_loss) == (
        "lookup", "linear", "after_before", 0.05)  # fmt: skip
    assert rome.regularisation == 0.0 and rome.sites == ["llm.layers.1.mlp.down_proj"]
    alpha = composed("evaluate", "editor=alphaedit_reference", "model=qwen").editor.hparams
    assert (alpha.search.lr, alpha.search.steps, alpha.search.clamp_norm) == (0.1, 24, 0.75)
    assert (alpha.null_space, alpha.null_threshold, alpha.ridge) == ("absolute", 0.02, 10.0)
    assert list(alpha.layers) == [13, 14, 15, 16, 17]


CORPUS = (
    "editor.hparams.corpus.text=4",
    "editor.hparams.corpus.audio=2",
    "editor.hparams.corpus.cache_dir=null",
)
SHORT = "editor.hparams.search.steps=3"


def test_the_reference_profiles_edit_the_shipped_tiny_model(shipped_lalm, pool, samples):
    """Both profiles as composed (their values: the test above) but for a shorter search (the same
    forms: lookup scale, linear decay, early stop) and a smaller key corpus."""
    s = samples[1]
    before = {n: p.detach().clone() for n, p in shipped_lalm.model.named_parameters()}
    rome = configured("rome_reference", shipped_lalm, pool, *CORPUS, SHORT)
    handle = rome.apply(request(s.instance, s.prompt))
    site = rome.sites[0]
    dw = (site.module.weight - before[site.param]).double()
    assert torch.linalg.matrix_rank(dw, rtol=1e-6) == 1  # a rank-one update of its one site
    handle.undo()
    alpha = configured("alphaedit_reference", shipped_lalm, pool, *CORPUS, SHORT)
    handle = alpha.apply(request(s.instance, s.prompt))
    for site in alpha.sites:
        dw = (site.module.weight - before[site.param]).float()
        p = alpha.projection(site)
        rank = int((torch.linalg.eigvalsh(p.double()) > 0.5).sum())
        assert 0 < rank < len(p)  # an absolute 2e-2 leaves a proper null space
        assert dw.abs().max() > 0 and torch.allclose(dw @ p, dw, atol=1e-5)  # the update lies in it
    handle.undo()
    assert all(torch.equal(p, before[n]) for n, p in shipped_lalm.model.named_parameters())

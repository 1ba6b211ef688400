"""MEND and KE reproduce the reference implementations' tensors (the code SAKE ran).

The fixture (../shared/data/hypernet-reference/, README inside) was computed by EasyEdit's MEND
and KE code: network weights in the reference's layout, inputs, running statistics, transformed
factors and updates. These tests load the weights into editors/mend.py and editors/ke.py and
compare every tensor within 1e-5 of its largest magnitude. Another dump made the same way (other
seeds, other shapes) is checked by pointing HYPERNET_REFERENCE at its folder: the shapes, the
parameter-to-module mapping and the sizes come from the file's own `config`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from editors.hypernet import Captured, nonzero_rows
from editors.ke import KEHParams, OneShotLearner
from editors.mend import MENDHParams, MENDTransforms

ROOT = Path(__file__).resolve().parents[1]
FOLDER = Path(os.environ.get("HYPERNET_REFERENCE", ROOT.parent / "shared" / "data" / "hypernet-reference"))
CASES = FOLDER / "cases.safetensors"

pytestmark = pytest.mark.skipif(not CASES.is_file(), reason=f"no reference fixture at {CASES}")


class Reference:
    def __init__(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            self.config = json.loads(f.metadata()["config"])
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def names(self, pattern: str) -> list[str]:
        """Distinct first groups of `pattern` over the keys, in natural order."""
        found = {m.group(1) for k in self.tensors if (m := re.fullmatch(pattern, k))}
        return sorted(found, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference(CASES)


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    scale = float(theirs.abs().max()) or 1.0
    err = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    assert err <= 1e-5 * scale, f"{what}: max |ours - reference| = {err:.3g} > 1e-5 x {scale:.3g}"


# ---------------------------------------------------------------------------------------- MEND
def mend_from_reference(ref: Reference, variant: str) -> MENDTransforms:
    """editors/mend.py's modules with the reference's weights, and the same sharing."""
    cfg = ref.config[f"mend/{variant}"]
    shapes = [tuple(p["shape"]) for p in cfg["params"]]
    hp = MENDHParams(
        layers=None, projections=(), edit_lr=0.0, rank=cfg["cfg"]["rank"],
        n_hidden=cfg["cfg"]["n_hidden"], shared=cfg["cfg"]["shared"],
    )  # fmt: skip
    mend = MENDTransforms(shapes, hp)
    weights = f"mend/{variant}/weights/"
    # the same grouping into networks and the same modes as the reference
    theirs = {}
    for i, p in enumerate(cfg["params"]):
        theirs.setdefault(p["module"], []).append(i)
        assert mend.modes[i] == p["mode"], f"{p['name']}: mode {mend.modes[i]} != reference {p['mode']}"
    ours = {}
    for i, key in enumerate(mend.keys):
        ours.setdefault(key, []).append(i)
    assert sorted(ours.values()) == sorted(theirs.values()), "weights grouped into networks differently"
    with torch.no_grad():
        for module, members in theirs.items():
            net = mend.networks[mend.keys[members[0]]]
            n_layers = len(ref.names(re.escape(f"{weights}mend.{module}.mlp.layers.") + r"(\d+)\..*"))
            assert n_layers == len(net.layers), (
                f"{module}: {n_layers} reference layers, {len(net.layers)} ours"
            )
            for lay, layer in enumerate(net.layers):
                prefix = f"{weights}mend.{module}.mlp.layers.{lay}."
                layer.u.copy_(ref[prefix + "u"])
                layer.v.copy_(ref[prefix + "v"])
                layer.bias.copy_(ref[prefix + "bias"])
                if hp.shared:
                    layer.mode_scale.copy_(ref[prefix + "mode_scale.weight"])
                    layer.mode_shift.copy_(ref[prefix + "mode_shift.weight"])
        mend.edit_lrs.copy_(ref[weights + "edit_lrs"])
    return mend


def mend_calls(ref: Reference, variant: str) -> list[tuple[str, bool]]:
    """(prefix, training) per reference call, in the order they were made."""
    base = f"mend/{variant}/"
    train = [(f"{base}train/{b}/", True) for b in ref.names(re.escape(base + "train/") + r"(batch\d+)/.*")]
    evals = [(f"{base}eval/{b}/", False) for b in ref.names(re.escape(base + "eval/") + r"(batch\d+)/.*")]
    assert train and evals, f"no MEND cases for {variant}"
    return train + evals


@pytest.mark.parametrize("variant", ["shared", "unshared"])
def test_mend_reproduces_the_reference_step_by_step(ref: Reference, variant: str) -> None:
    mend = mend_from_reference(ref, variant)
    for prefix, training in mend_calls(ref, variant):
        mend.train(training)
        for i in range(len(mend.keys)):
            p = f"{prefix}layer{i}/"
            what = f"{p} ({'training' if training else 'eval'})"
            x, delta = ref[p + "x"], ref[p + "delta"]
            keep = nonzero_rows(x, delta)
            assert torch.equal(keep, ref[p + "keep"]), f"{what}: kept rows differ"
            update = mend.update(i, x[keep], delta[keep])
            net = mend.networks[mend.keys[i]]
            stats = net.stats
            assert int(stats.count) == int(ref[p + "stats/k"]), f"{what}: count"
            x_std, delta_std = stats.std()
            for name, value in (
                ("u_mean", stats.x_mean), ("u_s", stats.x_m2), ("u_std", x_std),
                ("v_mean", stats.delta_mean), ("v_s", stats.delta_m2), ("v_std", delta_std),
            ):  # fmt: skip
                close(value, ref[f"{p}stats/{name}"], f"{what} stats/{name}")
            x_normed, delta_normed = stats.normalise(x[keep].float(), delta[keep].float())
            close(x_normed, ref[p + "x_normed"], f"{what} x_normed")
            close(delta_normed, ref[p + "delta_normed"], f"{what} delta_normed")
            h1 = net.layers[0](torch.cat([x_normed, delta_normed], -1), mend.modes[i])
            close(h1, ref[p + "h1"], f"{what} h1")
            x_out, delta_out = update.right, -update.left / mend.edit_lrs[i]
            close(x_out, ref[p + "x_out"], f"{what} x_out")
            close(delta_out, ref[p + "delta_out"], f"{what} delta_out")
            # the paper's sign: W_new = W - edit_lr * dW (the reference adds; editors/mend.py)
            close(update.dense(), -mend.edit_lrs[i] * ref[p + "dW"], f"{what} update")


def test_mend_eval_mode_leaves_the_statistics_alone(ref: Reference) -> None:
    mend = mend_from_reference(ref, "shared")
    prefix, _ = mend_calls(ref, "shared")[0]
    mend.train()
    mend.update(0, ref[prefix + "layer0/x"][:4], ref[prefix + "layer0/delta"][:4] + 1.0)
    before = {k: v.clone() for k, v in mend.state_dict().items()}
    mend.eval()
    mend.update(0, ref[prefix + "layer0/x"], ref[prefix + "layer0/delta"])
    after = mend.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------ KE
def conditioner_name(param: str) -> str:
    return param.replace(".", "_") + "_conditioner"


def ke_from_reference(ref: Reference) -> tuple[OneShotLearner, list[str]]:
    cfg = ref.config["ke"]
    names = [p["name"] for p in cfg["params"]]
    w = "ke/weights/"
    hp = KEHParams(
        layers=None, projections=(), lstm_dim=cfg["hidden_dim"], condition_dim=cfg["condition_dim"],
        hidden_dim=cfg["hidden_dim"], max_scale=cfg["max_scale"], zero_shift=False,
    )  # fmt: skip
    learner = OneShotLearner(
        ref[w + "condition.embedding.weight"], [tuple(p["shape"]) for p in cfg["params"]], hp
    )
    enc = learner.encoder
    with torch.no_grad():
        for name, value in enc.lstm.named_parameters():
            value.copy_(ref[f"{w}condition.lstm._module.{name}"])
        enc.out.weight.copy_(ref[w + "condition.linear._linear_layers.0.weight"])
        enc.out.bias.copy_(ref[w + "condition.linear._linear_layers.0.bias"])
        for name, update in zip(names, learner.updates, strict=True):
            for index in (0, 2):
                prefix = f"{w}conditioners.{conditioner_name(name)}.conditioners.{index}."
                linear = update.net[index]
                linear.parametrizations.weight.original0.copy_(ref[prefix + "weight_g"])
                linear.parametrizations.weight.original1.copy_(ref[prefix + "weight_v"])
                linear.bias.copy_(ref[prefix + "bias"])
                effective = f"ke/weights_effective/{prefix[len(w) :]}weight"
                close(linear.weight, ref[effective], f"{prefix} effective weight")
    return learner, names


def ke_batches(ref: Reference) -> list[str]:
    batches = ref.names(r"ke/(batch\d+)/.*")
    assert batches, "no KE cases"
    return batches


def weight_grad(grad: torch.Tensor) -> Captured:
    """A gradient matrix [d_out, d_in] as captured positions: delta^T x = grad."""
    return Captured(x=grad, delta=torch.eye(grad.shape[0]))


@pytest.mark.parametrize("batch", ["batch1", "batch2"])
def test_ke_reproduces_the_reference(ref: Reference, batch: str) -> None:
    if batch not in ke_batches(ref):
        pytest.skip(f"no ke/{batch} in this dump")
    learner, names = ke_from_reference(ref)
    c = f"ke/{batch}/"
    ids, mask = ref[c + "input_ids"], ref[c + "attention_mask"]
    sequences = [row[: int(m.sum())] for row, m in zip(ids, mask, strict=True)]  # a prefix of its length
    padded, lengths = learner.padded(sequences)
    close(learner.encoder.states(padded, lengths), ref[c + "lstm_state"], c + "lstm_state")
    condition = learner.condition(sequences)
    close(condition, ref[c + "condition"], c + "condition")
    for name, update in zip(names, learner.updates, strict=True):
        q = f"{c}{name}/"
        close(torch.cat(update(condition), -1), ref[q + "conditioner_out"], q + "conditioner_out")
        eta = update(condition)[-1]
        scale = learner.max_scale * torch.sigmoid(eta).mean()
        close(scale, ref[q + "scale"], q + "scale")
        grad = ref[q + "grad"]
        zero = update.delta(condition, weight_grad(torch.zeros_like(grad)), learner.max_scale).dense()
        ones = update.delta(condition, weight_grad(torch.ones_like(grad)), learner.max_scale).dense()
        close(zero / scale, ref[q + "b"], q + "b")
        close((ones - zero) / scale, ref[q + "a"], q + "a")
        delta = update.delta(condition, weight_grad(grad), learner.max_scale).dense()
        close(delta, ref[q + "delta"], q + "delta")
        # the reference's transposed-gradient branch is the same update in the other layout
        grad_t = ref[q + "transposed/grad"]
        delta_t = update.delta(condition, weight_grad(grad_t.T), learner.max_scale).dense().T
        close(delta_t, ref[q + "transposed/delta"], q + "transposed/delta")


def test_ke_conditions_each_edit_on_its_own_tokens_only(ref: Reference) -> None:
    """One edit's condition is the same alone and beside another (padding never enters)."""
    learner, _ = ke_from_reference(ref)
    a, b = torch.tensor([3, 4, 5]), torch.tensor([7, 1, 2, 9, 11])
    together = learner.condition([a, b])
    close(together[0], learner.condition([a])[0], "condition beside a longer sequence")
    close(together[1], learner.condition([b])[0], "condition beside a shorter sequence")

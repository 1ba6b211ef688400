"""lalms/hooks.py: the multi-module trace (`hooked_all`, with its stop), `hooked`, `Trace` and the
long-lived `Hooks`, on a small stack of layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lalms.hooks import Hook, Hooks, Trace, hooked, hooked_all


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def _hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_hooked_all_records_every_module():
    net, x = _net(), torch.randn(3, 4)
    seen: dict[int, torch.Tensor] = {}

    def keep(i):
        def fn(m, args, out):
            seen[i] = out.detach()

        return fn

    with hooked_all(Hook(net[i], keep(i)) for i in (0, 2, 4)):
        y = net(x)
    assert sorted(seen) == [0, 2, 4]
    assert torch.equal(seen[0], net[0](x))
    assert torch.equal(seen[2], net[2](net[1](net[0](x))))
    assert torch.equal(seen[4], y)
    assert _hook_count(net) == 0


def test_hooked_all_edits_outputs_and_inputs():
    net, x = _net(), torch.randn(3, 4)
    expected = net[4](net[3](net[2](net[1](2 * net[0](x)))))
    with hooked_all([Hook(net[0], lambda m, a, out: 2 * out)]):
        assert torch.allclose(net(x), expected)
    # a pre-hook with kwargs changes the module's input
    with hooked_all(
        [Hook(net[4], lambda m, args, kwargs: ((args[0] * 0,), kwargs), pre=True, with_kwargs=True)]
    ):
        assert torch.allclose(net(x), net[4].bias.expand(3, 2))
    assert torch.equal(net(x), net[4](net[3](net[2](net[1](net[0](x))))))
    assert _hook_count(net) == 0


def test_hooked_all_removes_hooks_when_the_forward_raises():
    net = _net()

    def fail(m, a, out):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with hooked_all([Hook(net[0], lambda m, a, out: None), Hook(net[2], fail)]):
            net(torch.randn(1, 4))
    assert _hook_count(net) == 0


def test_stop_ends_the_forward_after_the_chosen_module():
    net, x = _net(), torch.randn(3, 4)
    ran: list[str] = []
    kept: dict = {}

    def stop_here(m, args, out):
        ran.append("stop")
        kept["out"] = out.detach()

    with hooked_all(
        [
            Hook(net[0], lambda m, a: ran.append("pre"), pre=True),
            Hook(net[2], stop_here, stop=True),
            Hook(net[4], lambda m, a, out: ran.append("later")),
        ]
    ):
        result = net(x)  # never returns: the block goes on after it
        ran.append("after the forward")  # not reached either
    assert ran == ["pre", "stop"]
    assert "result" not in locals()
    assert torch.equal(kept["out"], net[2](net[1](net[0](x))))
    assert _hook_count(net) == 0


def test_stop_of_a_pre_hook_skips_its_module():
    net, ran = _net(), []
    with hooked_all([Hook(net[2], lambda m, a: ran.append("pre"), pre=True, stop=True),
                     Hook(net[2], lambda m, a, out: ran.append("module ran"))]):  # fmt: skip
        net(torch.randn(1, 4))
    assert ran == ["pre"] and _hook_count(net) == 0


def test_an_inner_block_leaves_an_outer_stop_to_its_block():
    net, ran = _net(), []
    with hooked_all([Hook(net[2], lambda m, a, out: ran.append("stop"), stop=True)]):
        with hooked_all([Hook(net[4], lambda m, a, out: ran.append("later"))]):
            net(torch.randn(1, 4))
        ran.append("inner block after the forward")  # skipped: the stop is the outer block's
    assert ran == ["stop"] and _hook_count(net) == 0


def test_hooked_and_trace_leave_no_hook():
    net, x = _net(), torch.randn(2, 4)
    with hooked(net[0], lambda m, a, out: out + 1):
        shifted = net[0](x)
    assert torch.allclose(shifted, net[0](x) + 1)
    with Trace(net[2], edit=lambda h: h * 0) as t:
        y = net(x)
    assert torch.equal(t.output, torch.zeros(2, 4))
    assert torch.equal(t.input, net[1](net[0](x)))
    assert torch.allclose(y, net[4](net[3](torch.zeros(2, 4))))
    assert _hook_count(net) == 0


def test_long_lived_hooks_until_removed():
    net, x = _net(), torch.randn(2, 4)
    plain = net(x)
    hooks = Hooks()
    assert not hooks and len(hooks) == 0
    calls: list[str] = []
    assert hooks.add(net[0], lambda m, a: calls.append("pre"), pre=True) is hooks
    hooks.add(net[4], lambda m, a, out: out * 0)
    assert len(hooks) == 2 and _hook_count(net) == 2
    for _ in range(2):  # in effect over several forwards
        assert torch.equal(net(x), torch.zeros(2, 2))
    assert calls == ["pre", "pre"]
    hooks.remove()
    assert not hooks and _hook_count(net) == 0
    assert torch.equal(net(x), plain)
    hooks.remove()  # removing again is harmless

"""Property test (issue 25, "Done when"): random sequences of what a user does with a KPGOptimizer —
steps with closures that work, raise or return NaN at some level, group edits, tensor-lr edits (valid
and NaN), state-dict round trips and checkpoint save/load — and after each action either the result
equals the brute-force KPG (one torch.optim optimizer per agent: torch.optim itself at k = 1), or a
clear exception was raised and the parameters, state and settings are bit-identical to before.

Every agent's model holds a parameter its policy never reads (no gradient: never stepped). The
hypothesis profile comes from conftest.py ("ci": derandomized, bounded examples).
"""

import copy
import io
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kpg
from kpg.app.checkpoint import load_checkpoint, save_checkpoint

from helpers import RTOL, Game, assert_close_to_scale, brute_force_step, torch_optimizer

OPTIMIZERS = {
    "sgd": dict(momentum=0.9, weight_decay=0.01),
    "adam": dict(weight_decay=0.01),
    "adamw": dict(),
    "rmsprop": dict(momentum=0.5, centered=True),
    "adagrad": dict(lr_decay=0.01),
}

ACTIONS = st.one_of(
    st.tuples(st.just("step")),
    st.tuples(st.just("failing_step"), st.sampled_from(["raise", "nan"]), st.integers(1, 3)),
    st.tuples(st.just("edit"), st.integers(0, 1), st.sampled_from(["lr", "weight_decay"]), st.floats(0.0, 0.2)),
    st.tuples(st.just("bad_edit"), st.integers(0, 1), st.sampled_from([-0.1, math.nan, math.inf, "0.1"])),
    st.tuples(st.just("tensor_lr"), st.integers(0, 1), st.floats(0.0, 0.2)),
    st.tuples(st.just("bad_tensor_lr"), st.integers(0, 1), st.sampled_from([-1.0, math.nan, math.inf])),
    st.tuples(st.just("round_trip")),
    st.tuples(st.just("checkpoint")),
)


class World:
    """kpg over one copy of a two-agent game, the brute force over another."""

    def __init__(self, optimizer: str, k: int):
        self.ours = Game(2, torch.float64, True, False, seed=3)
        for a, model in enumerate(self.ours.models):
            model.register_parameter("spare", nn.Parameter(torch.full((2,), 1.0 + a, dtype=torch.float64)))
        self.theirs = copy.deepcopy(self.ours)
        hyper = OPTIMIZERS[optimizer]
        self.opt = kpg.KPGOptimizer(self.ours.models, k=k, optimizer=optimizer, lr=0.05, **hyper)
        self.reference = [torch_optimizer(optimizer, list(m.parameters()), 0.05, **hyper) for m in self.theirs.models]
        self.k = k

    def snapshot(self):
        opt = self.opt
        buffers = [b.clone() for b in opt.agent_state.state_buffers.values() if b is not None]
        groups = [{key: v for key, v in g.items() if key not in ("params", "lr")} for g in opt.param_groups]
        lrs = [float(g["lr"]) for g in opt.param_groups]
        return (
            [opt.arena.param.clone(), *buffers, opt.agent_state.step.clone(), opt.agent_state.live.clone()],
            groups,
            lrs,
            opt.k,
        )

    def assert_unchanged(self, before):
        tensors, groups, lrs, k = self.snapshot()
        assert len(tensors) == len(before[0]) and all(torch.equal(a, b) for a, b in zip(tensors, before[0]))
        assert (groups, k) == (before[1], before[3])
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(lrs, before[2]))

    def assert_matches_reference(self):
        for a, (m1, m2) in enumerate(zip(self.ours.models, self.theirs.models)):
            for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
                assert_close_to_scale(p1.detach(), p2.detach(), RTOL[torch.float64], what=f"agent {a} {name}")

    def step(self):
        self.opt.step(self.ours.closure_with_context)
        brute_force_step(self.theirs, self.reference, self.k, None)
        self.assert_matches_reference()

    def refused(self, action, error):
        before = self.snapshot()
        with pytest.raises(error):
            action()
        self.assert_unchanged(before)

    def failing_closure(self, how: str, level: int):
        def closure(ctx):
            losses = self.ours.closure_with_context(ctx)
            if ctx.level == min(level, self.k):
                if how == "raise":
                    raise RuntimeError("the environment crashed")
                return losses * torch.tensor([1.0, math.nan], dtype=losses.dtype)
            return losses

        return closure

    def run(self, action):
        kind, *args = action
        groups = self.opt.param_groups
        if kind == "step":
            self.step()
        elif kind == "failing_step":
            how, level = args
            self.refused(
                lambda: self.opt.step(self.failing_closure(how, level)),
                RuntimeError if how == "raise" else FloatingPointError,
            )
        elif kind == "edit":
            agent, key, value = args
            groups[agent][key] = value
            self.reference[agent].param_groups[0][key] = value
            self.step()
        elif kind == "bad_edit":
            agent, value = args
            saved = groups[agent]["lr"]
            groups[agent]["lr"] = value
            self.refused(lambda: self.opt.step(self.ours.closure_with_context), (ValueError, TypeError))
            groups[agent]["lr"] = saved
        elif kind == "tensor_lr":
            agent, value = args
            groups[agent]["lr"] = torch.tensor(value, dtype=torch.float64)
            self.reference[agent].param_groups[0]["lr"] = value
            self.step()
        elif kind == "bad_tensor_lr":
            agent, value = args
            lr = groups[agent]["lr"]
            tensor = lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64)
            saved = float(tensor)
            groups[agent]["lr"] = tensor
            tensor.fill_(value)
            self.refused(lambda: self.opt.step(self.ours.closure_with_context), ValueError)
            tensor.fill_(saved)
        elif kind == "round_trip":
            before = self.snapshot()
            buffer = io.BytesIO()
            torch.save(self.opt.state_dict(), buffer)
            buffer.seek(0)
            self.opt.load_state_dict(torch.load(buffer, weights_only=True))
            self.assert_unchanged(before)
        elif kind == "checkpoint":
            before = self.snapshot()
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "checkpoint.pt"
                save_checkpoint(path, {"optimizer": self.opt.state_dict()})
                self.opt.load_state_dict(load_checkpoint(path)["optimizer"])
            self.assert_unchanged(before)


@settings(max_examples=20)
@given(
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    k=st.integers(1, 3),
    actions=st.lists(ACTIONS, min_size=1, max_size=6),
)
def test_any_sequence_of_user_actions_matches_the_reference_or_changes_nothing(optimizer, k, actions):
    world = World(optimizer, k)
    for action in actions:
        world.run(action)
    world.step()
    spares = [dict(m.named_parameters())["spare"] for m in world.ours.models]
    assert [s.tolist() for s in spares] == [[1.0, 1.0], [2.0, 2.0]]

"""kpg.app.games: closed-form payoffs and gradients by hand, the exact-gradient game against an independent
per-agent KPG loop (../shared/KPG.md), the sampled mode against the exact one, and ``kpg games``."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

from kpg.app import cli
from kpg.app.games import GAMES, GamePlay, GamesConfig, check_config, make_game, three_player_penalty_game


def _random_policies(copies: int, players: int, actions: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(copies, players, actions, generator=generator, dtype=torch.float64), dim=-1)


def _enumerated_payoffs(game, policies: torch.Tensor) -> torch.Tensor:
    """Expected payoffs [copies, players] by summing over every joint action, one copy at a time."""
    copies, players, actions = policies.shape
    result = torch.zeros(copies, players, dtype=torch.float64)
    for c in range(copies):
        for joint in itertools.product(range(actions), repeat=players):
            probability = math.prod(float(policies[c, p, a]) for p, a in enumerate(joint))
            result[c] += probability * game.payoffs[(slice(None), *joint)]
    return result


# ---- closed form, by hand -------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [-100.0, -10.0, -1000.0])
def test_penalty_game_payoffs_by_hand(penalty):
    game = make_game({-100.0: "penalty", -10.0: "penalty-10", -1000.0: "penalty-1000"}[penalty])
    uniform = torch.full((1, 2, 3), 1 / 3, dtype=torch.float64)
    corner = torch.tensor([[[1.0, 0, 0], [0, 0, 1.0]]], dtype=torch.float64)
    collide = torch.tensor([[[0, 0, 1.0], [0, 0, 1.0]]], dtype=torch.float64)
    uniform_payoff = torch.full((1, 2), (2 * penalty + 22) / 9, dtype=torch.float64)
    assert torch.allclose(game.expected_payoffs(uniform), uniform_payoff)
    assert game.expected_payoffs(corner).tolist() == [[10.0, 10.0]]
    assert game.expected_payoffs(collide).tolist() == [[penalty, penalty]]
    # Against a uniform partner, actions 0 and 2 are worth (p + 10) / 3 and action 1 is worth 2 / 3.
    values = game.action_values(uniform)[0, 0]
    assert torch.allclose(values, torch.tensor([(penalty + 10) / 3, 2 / 3, (penalty + 10) / 3], dtype=torch.float64))
    success, value = game.outcome(torch.cat([uniform, corner, collide]))
    assert success.tolist() == [False, True, False] and value[1] == 10.0


def test_matching_pennies_payoffs_and_distance_by_hand():
    game = make_game("pennies")
    # Player 0 plays heads with 0.8, player 1 with 0.3: matches with 0.8 * 0.3 + 0.2 * 0.7 = 0.38.
    policies = torch.tensor([[[0.8, 0.2], [0.3, 0.7]], [[0.52, 0.48], [0.47, 0.53]]], dtype=torch.float64)
    payoffs = game.expected_payoffs(policies)
    assert torch.allclose(payoffs[0], torch.tensor([0.38 - 0.62, 0.62 - 0.38], dtype=torch.float64))
    success, distance = game.outcome(policies)
    assert torch.allclose(distance, torch.tensor([0.3, 0.03], dtype=torch.float64))
    assert success.tolist() == [False, True]


def test_exact_gradient_by_hand():
    """One SGD step at k=1 moves agent i's logits by lr * pi_i * (v_i - pi_i . v_i), v_i its action values."""
    game = make_game("penalty")
    play = GamePlay(game, copies=1, lrs=[0.01], k=1, optimizer="sgd", dtype=torch.float64)
    with torch.no_grad():
        play.logits.copy_(torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)))
    before = play.logits.detach().clone()
    play.step()
    # Player 0 against (0.1, 0.6, 0.3): values (-100*0.1 + 10*0.3, 0.6*2, 10*0.1 - 100*0.3) = (-7, 1.2, -29).
    pi0, v0 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([-7.0, 1.2, -29.0], dtype=torch.float64)
    # Player 1 against (0.5, 0.3, 0.2): values (-50 + 2, 0.6, 5 - 20) = (-48, 0.6, -15).
    pi1, v1 = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), torch.tensor([-48.0, 0.6, -15.0], dtype=torch.float64)
    expected = torch.stack([pi0 * (v0 - pi0 @ v0), pi1 * (v1 - pi1 @ v1)])
    assert torch.allclose(play.logits.detach() - before, 0.01 * expected, rtol=1e-12, atol=1e-14)


def test_three_player_payoff_against_enumeration():
    game = make_game("penalty3")

    def rule(joint):
        targets = [a for a in joint if a != 3]
        if len(set(targets)) < len(targets):
            return -100.0
        return 10.0 if len(targets) == 3 else 2.0 if not targets else 0.0

    for joint in itertools.product(range(4), repeat=3):
        assert game.payoffs[:, joint[0], joint[1], joint[2]].tolist() == [rule(joint)] * 3
    policies = _random_policies(5, 3, 4, seed=1)
    assert torch.allclose(game.expected_payoffs(policies), _enumerated_payoffs(game, policies), rtol=1e-12)
    actions = torch.randint(0, 4, (5, 3, 7), generator=torch.Generator().manual_seed(2))
    sampled = game.sampled_payoffs(actions)
    for c, b in itertools.product(range(5), range(7)):
        assert sampled[c, :, b].tolist() == [rule(tuple(actions[c, :, b].tolist()))] * 3
    assert three_player_penalty_game(reward=1, penalty=-2, safe=3).payoffs[0, 3, 3, 3] == 3


@pytest.mark.parametrize("name", sorted(GAMES))
def test_every_game_against_enumeration(name):
    game = make_game(name)
    policies = _random_policies(4, game.players, game.actions, seed=3)
    assert torch.allclose(game.expected_payoffs(policies), _enumerated_payoffs(game, policies), rtol=1e-12)


# ---- the exact-gradient game against an independent KPG loop -----------------------------------


class _ReferenceOptimizer:
    """torch.optim's update formulas (foreach=False, fused=False) written out, for one agent's tensor."""

    def __init__(self, name: str, lr: float):
        self.name, self.lr = name, lr
        self.state = {"step": 0, "momentum_buffer": None, "exp_avg": None, "exp_avg_sq": None}

    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """New parameters and new state from ``param`` and ``state``; changes neither."""
        step = state["step"] + 1
        if self.name == "sgd":
            return param - self.lr * grad, dict(state, step=step)
        if self.name == "momentum":
            buffer = grad.clone() if state["momentum_buffer"] is None else 0.9 * state["momentum_buffer"] + grad
            return param - self.lr * buffer, dict(state, step=step, momentum_buffer=buffer)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        exp_avg = (1 - beta1) * grad if state["exp_avg"] is None else beta1 * state["exp_avg"] + (1 - beta1) * grad
        exp_avg_sq = (
            (1 - beta2) * grad * grad
            if state["exp_avg_sq"] is None
            else (beta2 * state["exp_avg_sq"] + (1 - beta2) * grad * grad)
        )
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denominator = exp_avg_sq.sqrt() / math.sqrt(bias2) + eps
        return param - (self.lr / bias1) * exp_avg / denominator, dict(
            step=step, momentum_buffer=None, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq
        )


def _reference_kpg(game, initial: torch.Tensor, lrs, k: int, optimizer: str, steps: int) -> list[torch.Tensor]:
    """Every copy's every player a separate tensor; each level restarts from the base parameters and
    the base optimizer state, only level k is committed. Returns the logits after every step."""
    copies, players, actions = initial.shape
    blocks = len(lrs)
    theta = [[initial[c % copies, p].clone() for p in range(players)] for c in range(copies * blocks)]
    opts = [[_ReferenceOptimizer(optimizer, lrs[c // copies]) for _ in range(players)] for c in range(copies * blocks)]
    trajectory = []
    for _ in range(steps):
        anticipated = theta
        for _level in range(1, k + 1):
            new_theta, new_states = [], []
            for c in range(copies * blocks):
                row_theta, row_states = [], []
                for p in range(players):
                    own = theta[c][p].clone().requires_grad_(True)
                    policies = [torch.softmax(own if q == p else anticipated[c][q], dim=0) for q in range(players)]
                    payoff = sum(
                        math.prod(policies[q][a] for q, a in enumerate(joint)) * game.payoffs[(p, *joint)]
                        for joint in itertools.product(range(actions), repeat=players)
                    )
                    (grad,) = torch.autograd.grad(-payoff, own)
                    updated, state = opts[c][p].update(theta[c][p], grad, opts[c][p].state)
                    row_theta.append(updated.detach())
                    row_states.append(state)
                new_theta.append(row_theta)
                new_states.append(row_states)
            anticipated = new_theta
        theta = anticipated
        for c, p in itertools.product(range(copies * blocks), range(players)):
            opts[c][p].state = new_states[c][p]
        trajectory.append(torch.stack([torch.stack(row) for row in theta]))
    return trajectory


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", ["penalty", "pennies", "penalty3"])
def test_exact_game_equals_independent_kpg_loop(name, k, optimizer):
    game = make_game(name)
    copies, lrs, steps = 2, [0.05, 0.4], 4
    play = GamePlay(game, copies=copies, lrs=lrs, k=k, optimizer=optimizer, seed=5, dtype=torch.float64)
    initial = play.logits.detach().view(len(lrs) * copies, game.players, game.actions)[:copies].clone()
    expected = _reference_kpg(game, initial, lrs, k, optimizer, steps)
    for step in range(steps):
        play.step()
        got = play.logits.detach().view(-1, game.players, game.actions)
        torch.testing.assert_close(got, expected[step], rtol=1e-10, atol=1e-12, msg=f"step {step + 1}")
    # The levels matter: with k >= 2 the committed step differs from the plain one.
    if k >= 2:
        plain = _reference_kpg(game, initial, lrs, 1, optimizer, steps)
        assert not torch.allclose(plain[-1], expected[-1], rtol=1e-6)


# ---- the sampled mode -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_step_approaches_the_exact_step(k):
    """With many samples, one sampled step (REINFORCE, leave-one-out baseline, joint-ratio surrogate)
    moves the logits as the exact step does; at k=2 the joint ratio carries the anticipation."""
    game = make_game("penalty")
    exact = GamePlay(game, copies=4, lrs=[0.002], k=k, optimizer="sgd", seed=7, dtype=torch.float64)
    sampled = GamePlay(
        game, copies=4, lrs=[0.002], k=k, optimizer="sgd", mode="sampled", batch=100_000, seed=7, dtype=torch.float64
    )
    start = exact.logits.detach().clone()
    exact.step()
    sampled.step()
    exact_move, sampled_move = exact.logits.detach() - start, sampled.logits.detach() - start
    error = (sampled_move - exact_move).norm() / exact_move.norm()
    assert error < 0.05, f"sampled step differs from the exact one by {error:.3f} (relative)"
    if k == 2:
        plain = GamePlay(game, copies=4, lrs=[0.002], k=1, optimizer="sgd", seed=7, dtype=torch.float64)
        plain.step()
        anticipation = exact_move - (plain.logits.detach() - start)
        captured = ((sampled_move - (plain.logits.detach() - start)) * anticipation).sum() / anticipation.norm() ** 2
        assert 0.8 < captured < 1.2, f"the sampled step carries {captured:.2f} of the exact anticipation"


# ---- kpg games ------------------------------------------------------------------------------------


def test_kpg_games_tiny_study(tmp_path, capsys):
    out = tmp_path / "study"
    cli.main(
        [
            "games",
            "--games",
            "pennies",
            "penalty3",
            "--ks",
            "1",
            "2",
            "--optimizers",
            "sgd",
            "adam",
            "--lrs",
            "0.1",
            "1",
            "--copies",
            "6",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 2 * 2 * 2 * 2
    assert {(r["game"], r["optimizer"], r["k"], r["lr"]) for r in results["rows"]} == set(
        itertools.product(["pennies", "penalty3"], ["sgd", "adam"], [1, 2], [0.1, 1.0])
    )
    for row in results["rows"]:
        assert row["copies"] == 6 and 0 <= row["share_ci95"][0] <= row["share"] <= row["share_ci95"][1] <= 1
        assert row["seconds_per_step"] > 0 and row["cpu_seconds_per_step"] > 0
    assert len(results["best"]) == 2 * 2 * 2
    assert results["cpu_seconds"] > 0 and results["total_seconds"] > 0
    assert (out / "games.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| pennies | adam |" in table and "ms per step (CPU ms)" in table
    assert "| penalty3 | sgd |" in capsys.readouterr().out


def test_kpg_games_sampled_mode_runs(tmp_path):
    out = tmp_path / "sampled"
    cli.main(
        [
            "games",
            "--games",
            "penalty",
            "--ks",
            "2",
            "--optimizers",
            "sgd",
            "--lrs",
            "0.1",
            "--copies",
            "4",
            "--steps",
            "2",
            "--mode",
            "sampled",
            "--batch",
            "8",
            "--workers",
            "1",
            "--no-plot",
            "--out",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mode"] == "sampled" and len(results["rows"]) == 1
    assert not (out / "games.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--games", "chess"], r"--games \('chess',\): expected one or more of penalty, "),
        (["--ks", "0"], r"--ks \(0,\): expected an integer >= 1"),
        (["--ks", "2", "-1"], r"--ks \(2, -1\): expected an integer >= 1"),
        (["--lrs"], r"--lrs \(\): expected at least one learning rate"),
        (["--lrs", "0.1", "-1"], r"--lrs \(0.1, -1.0\): expected a number > 0"),
        (["--lrs", "nan"], r"--lrs \(nan,\): expected a list of finite numbers; nan is not a finite number"),
        (["--optimizers", "lbfgs"], r"--optimizers \('lbfgs',\): expected one or more of sgd, "),
        (["--copies", "0"], r"--copies 0: expected an integer >= 1"),
        (["--mode", "sampled", "--batch", "1"], r"--batch 1: expected an integer >= 2 in sampled mode"),
        (["--ks", "3", "--anticipation", "momentum"], r"--ks \(3,\): expected k = 1 or 2 with --anticipation momentum"),
    ],
    ids=[
        "unknown-game",
        "k-zero",
        "k-negative",
        "empty-lrs",
        "negative-lr",
        "nan-lr",
        "unknown-optimizer",
        "no-copies",
        "one-sample",
        "momentum-k3",
    ],
)
def test_kpg_games_refuses_bad_options_with_the_usage_error_status(tmp_path, capsys, args, message):
    """Issue 25: a bad option of kpg games exits with status 2, as kpg train's do, and one line
    naming the option, its value and what it takes; nothing is written."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["games", *args, "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert re.match(r"kpg games: " + message, error), error
    assert "\n" not in error
    assert not out.exists()


def test_check_config_accepts_the_default_study():
    check_config(GamesConfig())
    with pytest.raises(ValueError, match="unknown game"):
        make_game("prisoners")


def test_momentum_anticipation_reaches_the_optimizer_and_refuses_k3():
    game = make_game("pennies")
    exact = GamePlay(game, copies=3, lrs=[0.3], k=2, optimizer="sgd", seed=2, dtype=torch.float64)
    momentum = GamePlay(
        game, copies=3, lrs=[0.3], k=2, optimizer="sgd", seed=2, dtype=torch.float64, anticipation="momentum"
    )
    for _ in range(4):
        exact.step()
        momentum.step()
    # The first two momentum steps anticipate nothing (gate 0), later ones predict: they differ from exact k=2.
    assert momentum.optimizer.anticipation == "momentum"
    assert not torch.allclose(exact.policies(), momentum.policies())
    with pytest.raises(ValueError, match="expected k = 1 or 2 with --anticipation momentum"):
        check_config(GamesConfig(ks=(1, 2, 3), anticipation="momentum"))

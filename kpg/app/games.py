"""Differentiable normal-form games, many independent copies at once, and ``kpg games``, a study of
where k-level anticipation changes the outcome (docs/games.md).

Every player of every copy is one agent; all agents' policy logits are one agent-batched tensor
``[copies * players, actions]`` (row ``copy * players + player``) stepped by one
:class:`~kpg.KPGOptimizer`, so 1000 copies of a 2-player game are 2000 agents in one fused pass.
Policies are the softmax of the logits. Two gradient modes:

- ``exact``: agent i's loss is minus its expected payoff with its own policy at the base
  parameters and the others' policies at level l-1 (computed inside ``ctx.anticipated()``), in
  closed form (one einsum per player position over all copies);
- ``sampled``: every step samples a batch of joint actions per copy from the current policies and
  takes REINFORCE with a leave-one-out baseline through K-MAPPO's joint-ratio surrogate
  (:func:`kpg.joint_ratio_loss`), the coupling the trainers use.

A learning-rate sweep runs in one optimizer: each learning rate gets its own block of copies (the
same initial logits in every block) and KPGOptimizer's per-agent learning rates.
"""

from __future__ import annotations

import itertools
import json
import math
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from kpg.couplings import joint_ratio_loss
from kpg.optim import KPGOptimizer
from kpg.options import check_options, require, require_ranges

# Within this distance of the best shared payoff a copy counts as at an optimal joint action (the
# penalty game's "expected payoff >= 9").
OPTIMUM_TOLERANCE = 1.0
# Within this total-variation distance of the mixed equilibrium (every player) a copy counts as converged.
EQUILIBRIUM_TOLERANCE = 0.05
Z_95 = 1.959963984540054

# Study names of the optimizers -> (KPGOptimizer optimizer, hyperparameters other than lr).
OPTIMIZERS: dict[str, tuple[str, dict[str, float]]] = {
    "sgd": ("sgd", {}),
    "momentum": ("sgd", {"momentum": 0.9}),
    "rmsprop": ("rmsprop", {}),
    "adam": ("adam", {}),
}
MODES = ("exact", "sampled")


@dataclass(frozen=True)
class Game:
    """A normal-form game: ``payoffs[p][a_0, ..., a_{P-1}]`` is player p's payoff at a joint action.

    ``equilibrium`` (one policy, the same for every player) makes the metric the distance to that
    mixed equilibrium; without it the game is cooperative (one payoff shared by all players) and the
    metric is whether a copy ends at an optimal joint action.
    """

    name: str
    payoffs: Tensor
    summary: str
    equilibrium: Tensor | None = None

    @property
    def players(self) -> int:
        return self.payoffs.shape[0]

    @property
    def actions(self) -> int:
        return self.payoffs.shape[1]

    @property
    def optimum(self) -> float:
        return float(self.payoffs[0].max())

    def action_values(self, policies: Tensor) -> Tensor:
        """``[copies, players, actions]`` policies -> ``[copies, players, actions]``: player p's
        expected payoff of each of its actions when every other player q plays ``policies[:, q]``."""
        players, copy = self.players, self.players  # einsum labels: 0..P-1 the players' actions, P the copy
        payoffs = self.payoffs.to(policies)
        values = []
        for player in range(players):
            operands: list = [payoffs[player], list(range(players))]
            for other in range(players):
                if other != player:
                    operands += [policies[:, other], [copy, other]]
            values.append(torch.einsum(*operands, [copy, player]))
        return torch.stack(values, dim=1)

    def expected_payoffs(self, policies: Tensor) -> Tensor:
        """``[copies, players]``: every player's expected payoff under the joint policy."""
        return (policies * self.action_values(policies)).sum(dim=-1)

    def sampled_payoffs(self, actions: Tensor) -> Tensor:
        """``[copies, players, batch]`` joint actions -> ``[copies, players, batch]`` payoffs."""
        strides = torch.tensor(
            [self.actions ** (self.players - 1 - p) for p in range(self.players)], device=actions.device
        )
        joint = (actions * strides[None, :, None]).sum(dim=1)  # [copies, batch]
        flat = self.payoffs.to(actions.device).reshape(self.players, -1)
        return flat[:, joint].permute(1, 0, 2)

    def outcome(self, policies: Tensor) -> tuple[Tensor, Tensor]:
        """Per copy: (success, value). Cooperative games: success = expected shared payoff within
        ``OPTIMUM_TOLERANCE`` of the best, value = that payoff. Games with a mixed equilibrium:
        value = the largest total-variation distance of a player's policy to it, success = value
        within ``EQUILIBRIUM_TOLERANCE``."""
        if self.equilibrium is None:
            value = self.expected_payoffs(policies)[:, 0]
            return value >= self.optimum - OPTIMUM_TOLERANCE, value
        distance = 0.5 * (policies - self.equilibrium.to(policies)).abs().sum(dim=-1)
        value = distance.max(dim=1).values
        return value <= EQUILIBRIUM_TOLERANCE, value

    @property
    def metric(self) -> str:
        if self.equilibrium is None:
            threshold = self.optimum - OPTIMUM_TOLERANCE
            return f"share of copies at an optimal joint action (expected payoff >= {threshold:g})"
        return (
            f"share of copies within {EQUILIBRIUM_TOLERANCE} of the mixed equilibrium (largest TV distance of a player)"
        )

    @property
    def value_name(self) -> str:
        return "expected payoff" if self.equilibrium is None else "distance to the equilibrium"


def _shared(payoff: Sequence, players: int, name: str, summary: str) -> Game:
    table = torch.tensor(payoff, dtype=torch.float64)
    return Game(name, table.expand(players, *table.shape).clone(), summary)


def penalty_game(penalty: float = -100.0) -> Game:
    """Claus & Boutilier (1998): [[p, 0, 10], [0, 2, 0], [10, 0, p]], shared by both players."""
    name = "penalty" if penalty == -100.0 else f"penalty{penalty:g}"
    return _shared(
        [[penalty, 0, 10], [0, 2, 0], [10, 0, penalty]],
        2,
        name,
        f"penalty game, p={penalty:g}: optimum 10 at (0,2)/(2,0), p at (0,0)/(2,2), a safe 2 at (1,1)",
    )


def three_player_penalty_game(reward: float = 10.0, penalty: float = -100.0, safe: float = 2.0) -> Game:
    """Three players, actions 0-2 are targets and 3 is safe, one payoff shared by all: ``reward``
    when the three pick distinct targets, ``penalty`` when two or more pick the same target,
    ``safe`` when all are safe, and 0 otherwise (one or two safe players beside distinct targets)."""
    table = torch.zeros(4, 4, 4, dtype=torch.float64)
    for joint in itertools.product(range(4), repeat=3):
        targets = [a for a in joint if a != 3]
        if len(set(targets)) < len(targets):
            table[joint] = penalty
        elif len(targets) == 3:
            table[joint] = reward
        elif not targets:
            table[joint] = safe
    return Game(
        "penalty3",
        table.expand(3, 4, 4, 4).clone(),
        f"3-player penalty game: {reward:g} for distinct targets, {penalty:g} on any collision, "
        f"{safe:g} all safe, 0 otherwise",
    )


def matching_pennies() -> Game:
    """Zero-sum: player 0 wins 1 when the coins match, player 1 when they differ; mixed equilibrium (0.5, 0.5)."""
    table = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    return Game(
        "pennies",
        torch.stack([table, -table]),
        "matching pennies (zero-sum), mixed equilibrium (0.5, 0.5)",
        equilibrium=torch.tensor([0.5, 0.5], dtype=torch.float64),
    )


def climbing_game() -> Game:
    """Claus & Boutilier (1998): optimum 11 at (0,0) guarded by -30, a safe basin around (1,1)-(2,2)."""
    return _shared(
        [[11, -30, 0], [-30, 7, 6], [0, 0, 5]],
        2,
        "climbing",
        "climbing game: optimum 11 at (0,0) next to -30 penalties, 7/6/5 elsewhere",
    )


def pure_coordination() -> Game:
    """10 times the 2x2 identity, shared: any matching pair is optimal."""
    return _shared([[10, 0], [0, 10]], 2, "coordination", "pure coordination: 10 when the actions match, 0 otherwise")


GAMES = {
    "penalty": penalty_game,
    "penalty-10": lambda: penalty_game(-10.0),
    "penalty-1000": lambda: penalty_game(-1000.0),
    "penalty3": three_player_penalty_game,
    "pennies": matching_pennies,
    "climbing": climbing_game,
    "coordination": pure_coordination,
}


def make_game(name: str) -> Game:
    if name not in GAMES:
        raise ValueError(f"unknown game {name!r}; choose from {', '.join(GAMES)}")
    return GAMES[name]()


class GamePlay:
    """``copies`` copies of ``game`` per learning rate, every player an agent of one KPGOptimizer.

    ``lrs`` gives the sweep: copies ``[i * copies, (i + 1) * copies)`` learn with ``lrs[i]`` and
    all blocks start from the same logits (drawn ``N(0, init_scale^2)`` from ``seed``).
    """

    def __init__(
        self,
        game: Game,
        copies: int,
        lrs: Sequence[float],
        k: int = 2,
        optimizer: str = "sgd",
        mode: str = "exact",
        batch: int = 32,
        clip_eps: float = 0.2,
        init_scale: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        anticipation: str = "exact",
        audit_anticipation: bool = False,
    ):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "sampled" and batch < 2:
            raise ValueError(f"batch must be >= 2 in sampled mode (the baseline leaves one sample out), got {batch}")
        self.game, self.mode, self.batch, self.clip_eps = game, mode, batch, clip_eps
        self.copies = copies * len(lrs)
        players, actions = game.players, game.actions
        self.generator = torch.Generator().manual_seed(seed)
        initial = torch.randn(copies, players, actions, generator=self.generator, dtype=torch.float64) * init_scale
        self.logits = nn.Parameter(initial.repeat(len(lrs), 1, 1).reshape(-1, actions).to(dtype))
        per_block = torch.tensor([float(lr) for lr in lrs], dtype=torch.float64)
        agent_lrs = per_block.repeat_interleave(copies * players).tolist()
        name, hyperparameters = OPTIMIZERS[optimizer]
        self.optimizer = KPGOptimizer(
            [self.logits],
            k=k,
            optimizer=name,
            lr=agent_lrs,
            agent_dim=0,
            anticipation=anticipation,
            audit_anticipation=audit_anticipation,
            **hyperparameters,
        )

    def policies(self) -> Tensor:
        """``[copies (all learning rates), players, actions]``, without gradient."""
        with torch.no_grad():
            return torch.softmax(self.logits, dim=-1).view(self.copies, self.game.players, self.game.actions)

    def step(self) -> Tensor:
        """One KPG step; returns the agents' losses at the committed level."""
        if self.mode == "exact":
            return self.optimizer.step(self._exact_loss)
        return self.optimizer.step(self._sampled_closure())

    def _exact_loss(self, ctx) -> Tensor:
        shape = (self.copies, self.game.players, self.game.actions)
        own = torch.softmax(self.logits, dim=-1).view(shape)
        with ctx.anticipated():
            values = self.game.action_values(torch.softmax(self.logits, dim=-1).view(shape))
        return -(own * values).sum(dim=-1).flatten()

    def _sampled_closure(self):
        copies, players, batch = self.copies, self.game.players, self.batch
        with torch.no_grad():
            log_policy = torch.log_softmax(self.logits, dim=-1)
            actions = torch.multinomial(log_policy.exp(), batch, replacement=True, generator=self.generator)
            payoffs = self.game.sampled_payoffs(actions.view(copies, players, batch)).to(log_policy)
            baseline = (payoffs.sum(dim=-1, keepdim=True) - payoffs) / (batch - 1)
            old_log_prob = log_policy.gather(1, actions)

        def by_player(per_agent: Tensor) -> Tensor:
            """[copies * players, batch] -> [players, copies * batch]: joint_ratio_loss couples dim 0."""
            return per_agent.view(copies, players, batch).transpose(0, 1).reshape(players, copies * batch)

        advantages = (payoffs - baseline).transpose(0, 1).reshape(players, copies * batch)

        def closure(ctx) -> Tensor:
            log_prob = torch.log_softmax(self.logits, dim=-1).gather(1, actions)
            with ctx.anticipated():
                anticipated = torch.log_softmax(self.logits, dim=-1).gather(1, actions)
            surrogate = joint_ratio_loss(
                by_player(log_prob),
                by_player(old_log_prob),
                advantages,
                by_player(anticipated),
                ctx.level,
                clip_eps=self.clip_eps,
            )
            # joint_ratio_loss averages over all copies' samples; times copies, every agent's
            # gradient is the mean over its own copy's batch.
            return surrogate.loss.sum() * copies

        return closure

    def train(self, steps: int) -> tuple[float, float]:
        """``steps`` KPG steps; returns the wall-clock and the CPU seconds (this process) per step."""
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - started) / max(steps, 1), (time.process_time() - cpu_started) / max(steps, 1)


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a share."""
    share = successes / trials
    denominator = 1 + Z_95**2 / trials
    centre = (share + Z_95**2 / (2 * trials)) / denominator
    half = Z_95 * math.sqrt(share * (1 - share) / trials + Z_95**2 / (4 * trials**2)) / denominator
    # At 0 or all successes the bound is exactly 0 or 1; rounding would put it a hair inside.
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == trials else centre + half
    return low, high


@dataclass
class GamesConfig:
    """A study of KPG on normal-form games: every game x optimizer x k over a learning-rate sweep,
    many copies each; a table with 95 % intervals over copies, JSON and a plot in --out."""

    games: tuple[str, ...] = (
        "penalty",
        "penalty-10",
        "penalty-1000",
        "penalty3",
        "pennies",
        "climbing",
        "coordination",
    )
    ks: tuple[int, ...] = (1, 2, 3)  # KPG levels; 1 is the plain optimizer step
    optimizers: tuple[str, ...] = ("sgd", "momentum", "rmsprop", "adam")  # momentum: SGD with momentum 0.9
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # the learning-rate sweep, the same for every optimizer
    copies: int = 200  # independent copies of a game per learning rate
    steps: int = 200  # KPG steps
    # exact: closed-form expected payoff; sampled: sampled joint actions through the K-MAPPO surrogate
    mode: Literal["exact", "sampled"] = "exact"
    # KPGOptimizer's anticipation for every cell: "momentum" predicts level 1 from each agent's last two
    # updates (k=1 and k=2 only; its k=1 is the plain step)
    anticipation: Literal["exact", "momentum"] = "exact"
    batch: int = 32  # sampled mode: joint actions sampled per copy and step
    clip_eps: float = 0.2  # sampled mode: the surrogate's clip range
    init_scale: float = 1.0  # initial logits ~ N(0, init_scale^2)
    seed: int = 0  # initial logits and samples; the same initial logits in every cell
    workers: int = 2  # processes running (game, optimizer, k) cells side by side
    threads: int = 1  # torch CPU threads per process
    out: Path = Path("results/games")  # results.md, results.json and games.png
    plot: bool = True

    def validate(self) -> None:
        """Raises :class:`kpg.options.OptionError` for a value out of range (types: kpg.options.check_options)."""
        unknown = [game for game in self.games if game not in GAMES]
        require(self, "", "games", bool(self.games) and not unknown, f"one or more of {', '.join(GAMES)}")
        require(self, "", "ks", len(self.ks) > 0, "at least one k (1 is the plain optimizer step)")
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        require(
            self, "", "optimizers", bool(self.optimizers) and not unknown, f"one or more of {', '.join(OPTIMIZERS)}"
        )
        require(self, "", "lrs", len(self.lrs) > 0, "at least one learning rate, e.g. --lrs 0.1 1")
        require_ranges(
            self,
            "",
            {
                "ks": (1, None, False),
                "lrs": (0, None, True),
                **dict.fromkeys(("copies", "steps", "workers", "threads"), (1, None, False)),
                "init_scale": (0, None, False),
            },
        )
        require(
            self,
            "",
            "batch",
            self.mode != "sampled" or self.batch >= 2,
            "an integer >= 2 in sampled mode (the baseline leaves one sample out)",
        )
        require(
            self,
            "",
            "ks",
            self.anticipation != "momentum" or max(self.ks) <= 2,
            "k = 1 or 2 with --anticipation momentum, which predicts only level 1",
        )


def check_config(config: GamesConfig) -> None:
    """Raises :class:`kpg.options.OptionError` (``kpg games`` exits with status 2) naming the first
    bad option, its value and what it takes (types first, then :meth:`GamesConfig.validate`)."""
    check_options(config)


def run_study(config: GamesConfig, command: str | None = None) -> dict:
    """Runs the study, writes ``results.json``, ``results.md`` and ``games.png`` into ``config.out``
    and returns the results."""
    check_config(config)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    cells = [
        (config, game, optimizer, k) for game in config.games for optimizer in config.optimizers for k in config.ks
    ]
    if config.workers > 1:
        with ProcessPoolExecutor(max_workers=config.workers) as executor:
            rows = [row for cell in executor.map(_run_cell, cells) for row in cell]
    else:
        rows = [row for cell in map(_run_cell, cells) for row in cell]
    results = {
        "command": command,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "games": {
            name: {
                "summary": make_game(name).summary,
                "metric": make_game(name).metric,
                "value": make_game(name).value_name,
            }
            for name in config.games
        },
        "rows": rows,
        "best": _best(rows),
        "cost_per_k": {
            k: {"seconds_per_step": wall, "cpu_seconds_per_step": cpu} for k, (wall, cpu) in _cost_per_k(rows).items()
        },
        "total_seconds": time.perf_counter() - started,
        # CPU time of this process and its workers: the study's cost whatever else shares the cores.
        "cpu_seconds": _cpu_seconds() - cpu_started,
        "threads": config.threads,
        "workers": config.workers,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (config.out / "results.md").write_text(markdown(results))
    if config.plot:
        plot(results, config.out / "games.png")
    return results


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _run_cell(cell: tuple[GamesConfig, str, str, int]) -> list[dict]:
    """One game, optimizer and k over the whole learning-rate sweep (one KPGOptimizer): a row per lr."""
    config, game_name, optimizer, k = cell
    torch.set_num_threads(config.threads)
    game = make_game(game_name)
    play = GamePlay(
        game,
        config.copies,
        config.lrs,
        k=k,
        optimizer=optimizer,
        mode=config.mode,
        batch=config.batch,
        clip_eps=config.clip_eps,
        init_scale=config.init_scale,
        seed=config.seed,
        anticipation=config.anticipation,
    )
    seconds, cpu_seconds = play.train(config.steps)
    success, value = game.outcome(play.policies())
    rows = []
    for index, lr in enumerate(config.lrs):
        block = slice(index * config.copies, (index + 1) * config.copies)
        rows.append(
            _row(game, optimizer, k, lr, success[block], value[block], seconds, cpu_seconds, play.optimizer.num_agents)
        )
    return rows


def _row(
    game: Game,
    optimizer: str,
    k: int,
    lr: float,
    success: Tensor,
    value: Tensor,
    seconds: float,
    cpu_seconds: float,
    agents: int,
) -> dict:
    copies = success.numel()
    low, high = wilson_interval(int(success.sum()), copies)
    value = value.double()
    value_half = Z_95 * float(value.std()) / math.sqrt(copies) if copies > 1 else 0.0
    return {
        "game": game.name,
        "optimizer": optimizer,
        "k": k,
        "lr": lr,
        "copies": copies,
        "share": float(success.double().mean()),
        "share_ci95": [low, high],
        "value": float(value.mean()),
        "value_ci95": value_half,
        "seconds_per_step": seconds,
        "cpu_seconds_per_step": cpu_seconds,
        "agents_per_step": agents,
    }


def _best(rows: list[dict]) -> list[dict]:
    """For every game, optimizer and k, the learning rate with the largest share (ties: the smaller lr)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["game"], row["optimizer"], row["k"])
        if key not in best or row["share"] > best[key]["share"]:
            best[key] = row
    return [
        {"game": g, "optimizer": o, "k": k, "lr": r["lr"], "share": r["share"], "share_ci95": r["share_ci95"]}
        for (g, o, k), r in best.items()
    ]


def _cost_per_k(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """k -> (median wall-clock, median CPU seconds per KPG step) over the cells (one row per cell)."""
    cells = {(r["game"], r["optimizer"], r["k"]): r for r in rows}
    cost = {}
    for k in sorted({r["k"] for r in rows}):
        mine = [r for (_, _, cell_k), r in cells.items() if cell_k == k]
        cost[k] = (
            statistics.median(r["seconds_per_step"] for r in mine),
            statistics.median(r["cpu_seconds_per_step"] for r in mine),
        )
    return cost


def _share(share: float, interval: Sequence[float]) -> str:
    return f"{share:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def markdown(results: dict) -> str:
    config = results["config"]
    lrs = config["lrs"]
    lines = [
        f"# kpg games: {config['mode']} gradients, {config['copies']} copies per learning rate, "
        f"{config['steps']} KPG steps, {config.get('anticipation', 'exact')} anticipation",
        "",
        f"Command: `{results['command']}`" if results["command"] else "",
        "",
        f"Total {results['total_seconds']:.1f} s wall-clock and {results['cpu_seconds']:.1f} CPU seconds, "
        f"{results['workers']} worker process(es) of {results['threads']} torch thread(s). Initial logits "
        f"~ N(0, {config['init_scale']}^2), seed {config['seed']}, the same in every cell. Shares with 95 % Wilson "
        "intervals over copies.",
        "",
        "## Metric per game",
        "",
    ]
    lines += [f"- `{name}`: {g['summary']}; metric: {g['metric']}." for name, g in results["games"].items()]
    lines += [
        "",
        "## Best learning rate per game, optimizer and k",
        "",
        "| game | optimizer | " + " | ".join(f"k={k}: share (lr)" for k in config["ks"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in config["ks"]) + " |",
    ]
    best = {(b["game"], b["optimizer"], b["k"]): b for b in results["best"]}
    for game in results["games"]:
        for optimizer in config["optimizers"]:
            cells = [
                f"{_share(b['share'], b['share_ci95'])} ({b['lr']:g})"
                for b in (best[(game, optimizer, k)] for k in config["ks"])
            ]
            lines.append(f"| {game} | {optimizer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost per k: median over the cells of the time per KPG step",
        "",
        "| k | wall-clock ms per step | CPU ms per step | CPU relative to k=" + str(min(config["ks"])) + " |",
        "| --- | --- | --- | --- |",
    ]
    cost = _cost_per_k(results["rows"])
    base = cost[min(config["ks"])][1]
    lines += [f"| {k} | {1000 * wall:.2f} | {1000 * cpu:.2f} | {cpu / base:.2f}x |" for k, (wall, cpu) in cost.items()]
    lines += [
        "",
        "## Every cell: share [95 % interval] per learning rate, mean value, time per KPG step",
        "",
        "| game | optimizer | k | "
        + " | ".join(f"lr={lr:g}" for lr in lrs)
        + " | mean value per lr | ms per step (CPU ms) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in lrs) + " | --- | --- |",
    ]
    cells: dict[tuple, list[dict]] = {}
    for row in results["rows"]:
        cells.setdefault((row["game"], row["optimizer"], row["k"]), []).append(row)
    for (game, optimizer, k), group in cells.items():
        shares = " | ".join(_share(r["share"], r["share_ci95"]) for r in group)
        values = " / ".join(f"{r['value']:.3g}" for r in group)
        lines.append(
            f"| {game} | {optimizer} | {k} | {shares} | {values} | "
            f"{1000 * group[0]['seconds_per_step']:.2f} ({1000 * group[0]['cpu_seconds_per_step']:.2f}), "
            f"{group[0]['agents_per_step']} agents |"
        )
    lines += [
        "",
        "Value: the mean expected shared payoff (cooperative games) or the mean distance to the mixed "
        "equilibrium (pennies). Time per KPG step: all learning rates' copies in one step (one optimizer), "
        "k levels; wall-clock (with the other workers and whatever else runs beside it) and, in brackets, "
        "the CPU time of the worker's process, which load does not inflate.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Metric against learning rate, one line per k (95 % band), a panel per game and optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    games, optimizers = list(results["games"]), config["optimizers"]
    figure, axes = plt.subplots(
        len(games),
        len(optimizers),
        figsize=(3.4 * len(optimizers), 2.6 * len(games)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for i, game in enumerate(games):
        for j, optimizer in enumerate(optimizers):
            ax = axes[i][j]
            for k in config["ks"]:
                cell = [r for r in results["rows"] if r["game"] == game and r["optimizer"] == optimizer and r["k"] == k]
                lrs = [r["lr"] for r in cell]
                ax.plot(lrs, [r["share"] for r in cell], marker="o", markersize=3, label=f"k={k}")
                ax.fill_between(lrs, [r["share_ci95"][0] for r in cell], [r["share_ci95"][1] for r in cell], alpha=0.2)
            ax.set_xscale("log")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{game}, {optimizer}", fontsize=9)
            if j == 0:
                ax.set_ylabel("share of copies" if game != "pennies" else "share at equilibrium", fontsize=8)
            if i == len(games) - 1:
                ax.set_xlabel("learning rate", fontsize=8)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(
        f"kpg games ({config['mode']} gradients, {config['copies']} copies per lr, "
        f"{config['steps']} steps, "
        "95 % intervals)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def games_command(config: GamesConfig) -> dict:
    """``kpg games``: the study, its table printed (``kpg`` has checked the options: a bad one exits
    with status 2 and the reason)."""
    command = "kpg " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["games"] else None
    results = run_study(config, command)
    print((config.out / "results.md").read_text())
    print(f"plot: {config.out / 'games.png'}" if config.plot else "")
    return results

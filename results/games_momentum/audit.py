"""How good is the momentum prediction in the games where exact k=2 helps? Runs GamePlay with
anticipation="momentum" and audit_anticipation=True (the exact level-1 step computed beside the
prediction at every step) and prints, over the copies, the median gate, cos(u1, exact level-1
step), relative error and norm ratio at a few steps, and the final share.

    python results/games_momentum/audit.py
"""

import torch

from kpg.app.games import GamePlay, make_game

CASES = (("pennies", "sgd", 1.0), ("penalty", "sgd", 0.3), ("penalty", "adam", 1.0))
REPORT_STEPS = (3, 10, 50, 199)

for game_name, optimizer, lr in CASES:
    game = make_game(game_name)
    play = GamePlay(
        game, copies=200, lrs=[lr], k=2, optimizer=optimizer, anticipation="momentum", audit_anticipation=True
    )
    print(f"{game_name}, {optimizer}, lr {lr}: median over agents (200 copies x {game.players} players)")
    for step in range(200):
        play.step()
        if step in REPORT_STEPS:
            audit = play.optimizer.stats.anticipation_audit
            cells = "  ".join(f"{name} {float(torch.nanmedian(value)):+.3f}" for name, value in audit.items())
            print(f"  step {step + 1:>3}: {cells}")
    success, _ = game.outcome(play.policies())
    print(f"  final share {float(success.double().mean()):.2f}")

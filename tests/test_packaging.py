"""The install's shape: the core needs only torch and numpy (``import kpg`` and a KPGOptimizer step
work with every extra missing, and ``kpg train`` names the extra to install), pyproject's extras
match what the code checks, and the package ships its type marker and license."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kpg.app.extras import EXTRAS, missing_modules, require_extra

ROOT = Path(__file__).parents[1]
# Import names of every optional dependency (the train and envs extras, and what they pull in).
OPTIONAL_MODULES = (*EXTRAS["train"], "gymnasium", "gymnasium_robotics", "mujoco", "magent2")


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where importing any optional module fails as if it were not
    installed (``sys.modules[name] = None`` makes ``import name`` raise ModuleNotFoundError)."""
    blocker = f"import sys\nfor name in {OPTIONAL_MODULES!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_import_kpg_and_an_optimizer_step_need_no_extras():
    result = run_without_extras("""
        import torch
        import kpg

        torch.manual_seed(0)
        actor = kpg.nn.AgentMLP(3, 4, 2, hidden_sizes=(8,))
        opt = kpg.KPGOptimizer(actor, k=2, optimizer="adam", lr=0.1)
        obs = torch.randn(3, 5, 4)
        before = [p.detach().clone() for p in actor.parameters()]
        opt.step(lambda ctx: actor(obs).square().mean(dim=(1, 2)))
        assert all(not torch.equal(b, p) for b, p in zip(before, actor.parameters()))
        print("stepped")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stepped"


@pytest.mark.parametrize("command", ["train", "compare"])
def test_kpg_command_without_the_train_extra_names_it(command):
    result = run_without_extras(f"""
        from kpg.app.cli import main
        main([{command!r}, "--help"])
    """)
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f"kpg {command} needs pettingzoo, mpe2, tyro, tqdm, matplotlib, tensorboard" in message
    assert "pip install 'kpg[train]'" in message


def test_require_extra_passes_here_and_rejects_unknown_extras():
    assert missing_modules("train") == []  # this environment has every extra (make setup installs them)
    require_extra("train", "kpg train")
    with pytest.raises(ValueError, match="unknown extra 'plots'"):
        missing_modules("plots")


def test_pyproject_core_and_extras_match_the_code():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [dep.split(">")[0] for dep in project["dependencies"]] == ["torch", "numpy"]
    extras = project["optional-dependencies"]
    # Dependencies with an environment marker (tomli below Python 3.11) are not checked by require_extra.
    train = [dep.split(">")[0].split("=")[0] for dep in extras["train"] if ";" not in dep]
    assert tuple(name.replace("-", "_") for name in train) == EXTRAS["train"]
    assert {"train", "envs", "test", "lint"} <= set(extras)
    assert project["license"] == {"text": "MIT"}


def test_kpg_never_imports_benchmarl_and_kpg_benchmarl_names_its_extra():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, kpg; print('benchmarl' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stdout + result.stderr
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys\nsys.modules['benchmarl'] = None\nimport kpg.benchmarl"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert blocked.returncode == 1
    assert "kpg.benchmarl needs BenchMARL (benchmarl is not installed): pip install 'kpg[benchmarl]'" in blocked.stderr


def test_package_ships_py_typed_and_the_repository_its_license():
    assert (ROOT / "kpg" / "py.typed").is_file()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")

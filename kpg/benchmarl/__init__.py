"""K-MAPPO inside BenchMARL (``pip install 'kpg[benchmarl]'``; docs/benchmarl.md).

Importing this module registers ``kmappo`` in BenchMARL's algorithm registry and Hydra's config
store. From the command line (BenchMARL's entry point with kmappo registered)::

    python -m kpg.benchmarl.run algorithm=kmappo task=vmas/navigation algorithm.k=2

From Python::

    from benchmarl.environments import VmasTask
    from benchmarl.experiment import ExperimentConfig
    from benchmarl.models import MlpConfig
    from kpg.benchmarl import Experiment, KMappoConfig

    Experiment(task=VmasTask.NAVIGATION.get_from_yaml(), algorithm_config=KMappoConfig.get_from_yaml(),
               model_config=MlpConfig.get_from_yaml(), seed=0, config=ExperimentConfig.get_from_yaml()).run()

``import kpg`` never imports BenchMARL; only this module does.
"""

from __future__ import annotations

try:
    import benchmarl.algorithms
except ModuleNotFoundError as err:
    missing = (err.name or "benchmarl").split(".")[0]
    raise ModuleNotFoundError(
        f"kpg.benchmarl needs BenchMARL ({missing} is not installed): pip install 'kpg[benchmarl]' "
        "(from a checkout: pip install -e '.[benchmarl]')",
        name=missing,
    ) from err

from kpg.benchmarl.algorithm import KMappo, KMappoConfig
from kpg.benchmarl.experiment import Experiment

ALGORITHM_NAME = "kmappo"


def register() -> None:
    """Adds ``kmappo`` to BenchMARL's algorithm registry and, where Hydra is installed, its config
    schema to Hydra's config store (as BenchMARL does for its own algorithms). Idempotent."""
    benchmarl.algorithms.algorithm_config_registry[ALGORITHM_NAME] = KMappoConfig
    try:
        from hydra.core.config_store import ConfigStore
    except ModuleNotFoundError:
        return
    ConfigStore.instance().store(name=f"{ALGORITHM_NAME}_config", group="algorithm", node=KMappoConfig)


register()

__all__ = ["ALGORITHM_NAME", "Experiment", "KMappo", "KMappoConfig", "register"]

"""BenchMARL's entry point with kpg's algorithms registered: every ``python -m benchmarl.run`` command
works here, plus ``algorithm=kmappo``::

    python -m kpg.benchmarl.run algorithm=kmappo task=vmas/navigation algorithm.k=2
    python -m kpg.benchmarl.run algorithm=kmappo task=vmas/balance algorithm.k=2 seed=1 \\
        experiment.restore_file=PATH/checkpoints/checkpoint_60000.pt   # resume
"""

from __future__ import annotations

import hydra
from benchmarl.hydra_config import (
    load_algorithm_config_from_hydra,
    load_experiment_config_from_hydra,
    load_model_config_from_hydra,
    load_task_config_from_hydra,
)
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kpg.benchmarl import Experiment


def experiment_from_hydra(cfg: DictConfig, task_name: str) -> Experiment:
    """What ``benchmarl.hydra_config.load_experiment_from_hydra`` builds, as a kpg.benchmarl.Experiment."""
    return Experiment(
        task=load_task_config_from_hydra(cfg.task, task_name),
        algorithm_config=load_algorithm_config_from_hydra(cfg.algorithm),
        model_config=load_model_config_from_hydra(cfg.model),
        critic_model_config=load_model_config_from_hydra(cfg.critic_model),
        seed=cfg.seed,
        config=load_experiment_config_from_hydra(cfg.experiment),
    )


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    choices = HydraConfig.get().runtime.choices
    print(f"\nAlgorithm: {choices.algorithm}, Task: {choices.task}\n\nLoaded config:\n\n{OmegaConf.to_yaml(cfg)}")
    experiment_from_hydra(cfg, task_name=choices.task).run()


if __name__ == "__main__":
    main()

"""Training: ``train(cfg) -> TrainResult`` with health monitoring, checkpoints and resume."""

from lensforge.train.config import TrainConfig, resolve_config
from lensforge.train.run import LoadedRun, load_run

__all__ = ["LoadedRun", "TrainConfig", "load_run", "resolve_config", "train"]


def __getattr__(name: str):  # train() pulls in torch-heavy modules; import them on first use
    if name == "train":
        from lensforge.train.trainer import train

        return train
    raise AttributeError(name)

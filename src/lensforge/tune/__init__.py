"""Hyperparameter tuning on Optuna: ``tune(data, trials=20) -> TuneResult``.

Every trial is an ordinary run folder (``OUT/trials/NNNN``) scored on its ONNX bundle;
the study lives in a journal file or a database, so a killed tune resumes and several
processes can share one study. Optuna (the ``tune`` extra) is imported on first use.
"""

from lensforge.tune.config import TuneConfig, parse_duration
from lensforge.tune.objectives import OBJECTIVES
from lensforge.tune.space import ChoiceParam, FloatParam, SearchSpace, default_space

__all__ = ["OBJECTIVES", "ChoiceParam", "FloatParam", "SearchSpace", "TuneConfig", "TuneResult", "default_space",
           "parse_duration", "run_study", "tune"]


def __getattr__(name: str):  # tune() pulls in torch and Optuna: import them on first use
    if name in ("tune", "run_study"):
        from lensforge.tune import study

        return getattr(study, name)
    if name == "TuneResult":
        from lensforge.tune.results import TuneResult

        return TuneResult
    raise AttributeError(name)

"""Evaluation of a run (PyTorch) or a bundle (ONNX Runtime) on a data split."""

from lensforge.evaluate.runner import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]

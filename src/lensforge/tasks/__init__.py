"""The Task seam: everything that differs between classification, detection, segmentation.

A :class:`Task` is registered once per task, keyed on the ``task`` field that source,
runs and bundles carry. Stages ask the task instead of branching on its name. It has
two halves, as the OOD detectors have fit (torch) and score (torch-free):

* the torch-free half, on the :class:`Task` itself: target handling for data tables and
  splits, the primary metric, the bundle's output names, postprocessing from raw ONNX
  outputs to predictions, and the JSON row of ``predict`` and of the server;
* the torch half, :meth:`Task.torch`, imported only when called: model builder, loss,
  target-aware augmentation and collate, the training entry point, the export wrapper.
  It lives in ``lensforge.tasks.torch_<name>`` so that a deployment host (NumPy, Pillow,
  ONNX Runtime) never imports torch through this package.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lensforge.errors import UsageError
from lensforge.registry import Registry


class Task:
    """How one task's targets, outputs and predictions behave (torch-free half).

    Attributes:
        name: registry name, written into sources, runs and bundles.
        target_kind: "class_index", "boxes", later "mask".
        primary_metric: the validation metric that picks the best epoch (higher is better),
            the key of a metrics row without its ``val_`` prefix.
        torch_module: the module holding the torch half (see :meth:`torch`).
    """

    name: str = ""
    target_kind: str = ""
    primary_metric: str = ""
    torch_module: str = ""

    def collate(self, targets: Sequence[Any]) -> np.ndarray:
        """A data table's targets container, indexable by an index array."""
        raise NotImplementedError

    def stratify_key(self, target: Any) -> int:
        """The class that splits stratify on."""
        raise NotImplementedError

    def describe_metric(self, value: float, split: str) -> str:
        """The primary metric in words, e.g. 'val acc 98.5%'."""
        return f"{split} {self.primary_metric} {value:.3f}"

    def describe_evaluation(self, metrics: dict[str, Any]) -> list[str] | None:
        """What ``lensforge evaluate`` prints of ``metrics`` (None: the classifier's lines, built in the CLI)."""
        return None

    def to_input_target(self, target: Any, original_size: tuple[int, int], pre: Any) -> Any:
        """A target in the model input's pixels, given the decoded image's (width, height)."""
        return target

    def predict_batch(self, bundle: Any, pixels: np.ndarray, sizes: Sequence[tuple[int, int]], *,
                      guardrails: Any = None, top_k: int = 5) -> list[dict[str, Any]]:
        """One prediction row per image of a batch run through ``bundle`` (what ``predict`` and the server answer).

        ``pixels`` are the model inputs (N, C, H, W) uint8 made by
        :func:`lensforge.data.preprocess.resize_to_input`, ``sizes`` the decoded images' (width,
        height). With ``guardrails`` (:class:`lensforge.deploy.guardrails.Guardrails`) each row also
        carries its verdicts (``ood``, ``ood_score``, ``quality``, ``abstain``).
        """
        raise NotImplementedError

    def torch(self) -> Any:
        """The torch half: a module-level object ``TASK`` in :attr:`torch_module`."""
        try:
            module = importlib.import_module(self.torch_module)
        except ImportError as e:
            raise UsageError(f"{self.name} training needs the train extra ({e.name} is missing): "
                             "pip install 'lensforge[train]'") from None
        return module.TASK


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return TASKS.register(task.name)(task)


def get_task(name: str) -> Task:
    _load_builtin_tasks()
    return TASKS.get(name)


def list_tasks(pattern: str = "*") -> list[str]:
    _load_builtin_tasks()
    return TASKS.list(pattern)


def _load_builtin_tasks() -> None:
    # imported here, not at the top: each task module registers itself and imports this one
    from lensforge.tasks import classification, detection  # noqa: F401


__all__ = ["TASKS", "Task", "get_task", "list_tasks", "register_task"]

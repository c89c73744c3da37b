"""Detection training: FCOS target assignment, loss, target-aware augmentation and the trainer.

``train_detector(cfg)`` is the detection task's training entry point (reached through
``lensforge.train.train``, which dispatches on the data's task); it writes the same run
folder as classification training, with ``task: detection`` and the ``detection`` head.
"""

from typing import Any

__all__ = ["train_detector"]


def __getattr__(name: str) -> Any:  # the trainer pulls in the whole training stack: import it on first use
    if name == "train_detector":
        from lensforge.train.detection.trainer import train_detector

        return train_detector
    raise AttributeError(name)

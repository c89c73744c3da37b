"""Knowledge distillation: a student learns from a teacher's soft targets (Hinton et al., 2015).

:class:`DistillationLoss` mixes the usual loss on the labels with the KL divergence to
the teacher's temperature-softened probabilities. :class:`Teacher` turns the student's
augmented batch into teacher logits, whatever the teacher was trained on: it converts
grey <-> RGB, resizes to the teacher's input size and normalises with the teacher's
statistics, so a 1-channel 8 px student can learn from a 3-channel 224 px teacher. The
teacher is an in-memory model (the unpruned model while fine-tuning a pruned one), a
run folder (PyTorch) or a bundle (ONNX Runtime, so any exported model can teach). A
bundle takes 8-bit pixels, so its teacher sees the batch rounded to the nearest grey
level (at most half a level off for augmented pixels between levels), as a deployed
model would.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.errors import UsageError
from lensforge.models.normalize import Normalize

# ITU-R 601-2 luma, the weights Pillow uses for convert("L"): a grey student's pixels were made this way.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch.

    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones
    as T changes (Hinton et al., 2015, section 2).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base(student, targets) + alpha * T^2 * KL(teacher_T || student_T)``.

    Args:
        base: the loss on the labels, e.g. ``nn.CrossEntropyLoss(label_smoothing=0.1)``
            or timm's ``SoftTargetCrossEntropy`` for mixup targets.
        temperature: softens both distributions (> 0); 4 is the usual choice for
            classifiers with few classes.
        alpha: weight of the distillation term in [0, 1]; 0 is plain training.
    """

    def __init__(self, base: nn.Module, *, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise UsageError(f"distillation temperature must be a positive number, not {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise UsageError(f"distillation alpha must be between 0 and 1, not {alpha!r}")
        self.base = base
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise UsageError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ in shape")
        hard = self.base(student_logits, targets)
        if self.alpha == 0:
            return hard
        soft = distillation_kl(student_logits, teacher_logits.to(student_logits.device), self.temperature)
        return (1 - self.alpha) * hard + self.alpha * soft

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


def soft_targets_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of samples where student and teacher have the same top-1 class."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise UsageError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must be the same (N, K) shape")
    same = student_logits.argmax(1) == teacher_logits.to(student_logits.device).argmax(1)
    return float(same.float().mean()) if len(same) else 0.0


class Teacher:
    """Teacher logits for the student's batch, adapted to the teacher's own input.

    Call it with the student's augmented batch *before* normalisation: float32 in [0, 1],
    shape (N, C, H, W) with C in {1, 3}. It returns float32 logits (N, K) on the batch's
    device, without gradients.

    Attributes:
        preprocess: the teacher's input size, channels and mean/std.
        class_names: the teacher's classes, in logit order.
        source: where the teacher came from (a path, or "model").
        kind: "model" (in-memory), "run" (PyTorch) or "bundle" (ONNX Runtime).
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess,
                 class_names: Sequence[str], *, source: str, kind: str) -> None:
        """``logits_fn`` takes the batch as :meth:`pixels` makes it: [0, 1], the teacher's channels and size."""
        self._logits_fn = logits_fn
        self.preprocess = preprocess
        self.class_names = list(class_names)
        self.source = source
        self.kind = kind

    @classmethod
    def from_model(cls, model: nn.Module, preprocess: Preprocess, class_names: Sequence[str], *,
                   source: str = "model", kind: str = "model",
                   device: str | torch.device | None = None) -> Teacher:
        """A PyTorch teacher; ``model`` is put in eval mode and frozen (pass a copy to keep training it)."""
        model.eval().requires_grad_(False)
        if device is not None:
            model.to(device)
        model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
        normalize = Normalize(preprocess.mean, preprocess.std, pixel_max=1.0).to(model_device)

        def logits(pixels: torch.Tensor) -> torch.Tensor:
            return model(normalize(pixels.to(model_device)))

        return cls(logits, preprocess, class_names, source=source, kind=kind)

    def __repr__(self) -> str:
        size = "x".join(map(str, self.preprocess.input_size))
        return f"Teacher({self.source!r}, kind={self.kind}, input={self.preprocess.channels}x{size})"

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The student's [0, 1] batch converted to the teacher's channels and size, still in [0, 1]."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise UsageError(f"teacher input must be an image batch (N, 1 or 3, H, W) in [0, 1], not {shape}")
        x = images.float()
        channels = self.preprocess.channels
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            x = (x * x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
        size = tuple(self.preprocess.input_size)
        if tuple(x.shape[-2:]) != size:
            # antialias: downscaling without it aliases fine detail the teacher never saw
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.contiguous()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: the logits enter the student's autograd graph
            logits = self._logits_fn(self.pixels(images))
        return logits.float().to(images.device)


def load_teacher(path: str | os.PathLike[str], *, class_names: Sequence[str],
                 device: str | torch.device | None = None) -> Teacher:
    """Load a teacher from a run folder (PyTorch, on ``device``) or a bundle (ONNX Runtime, CPU).

    Raises:
        UsageError: ``path`` is neither a run nor a bundle, or the teacher's classes are
            not exactly ``class_names`` in the same order.
        ArtifactError: the run or bundle is damaged (missing weights, altered files).
    """
    from lensforge.artifacts import resolve_artifact

    folder = Path(path)
    try:
        artifact = resolve_artifact(folder)
    except UsageError as e:
        raise UsageError(f"teacher {e}") from None
    if artifact.is_bundle:
        teacher = _bundle_teacher(folder)
    else:
        from lensforge.train.run import load_run

        run = load_run(folder)
        teacher = Teacher.from_model(run.model, run.preprocess, run.class_names, source=str(folder), kind="run",
                                     device=device)
    _check_classes(teacher, list(class_names))
    return teacher


def _bundle_teacher(folder: Path) -> Teacher:
    from lensforge.deploy.bundle import load_bundle

    bundle = load_bundle(folder)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        levels = pixels.detach().float().cpu().mul(255).round_().clamp_(0, 255).to(torch.uint8)
        out, _features = bundle.predict_uint8(levels.numpy())
        return torch.from_numpy(out)

    return Teacher(logits, bundle.preprocess, bundle.class_names, source=str(folder), kind="bundle")


def _check_classes(teacher: Teacher, student: list[str]) -> None:
    if teacher.class_names == student:
        return
    missing = [name for name in student if name not in teacher.class_names]
    extra = [name for name in teacher.class_names if name not in student]
    if missing or extra:
        parts = [f"{label}: {_few(names)}" for label, names in (("missing in teacher", missing),
                                                                 ("extra in teacher", extra)) if names]
        detail = "; ".join(parts)
    else:
        detail = f"same classes in another order (teacher: {_few(teacher.class_names)})"
    raise UsageError(f"teacher {teacher.source}: class names differ from the student's ({detail})")


def _few(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

"""Knowledge distillation: the loss against the hand formula, and teachers from runs and bundles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lensforge.data.preprocess import Preprocess
from lensforge.errors import UsageError
from lensforge.train.distill import DistillationLoss, Teacher, load_teacher, soft_targets_agreement

STUDENT_LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, 1.0]])  # top-1 agrees with the teacher on row 0 only
TEACHER_LOGITS = torch.tensor([[3.0, 0.0, -1.0], [-0.5, 1.5, 0.0]])
LABELS = torch.tensor([0, 2])


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """sum_i p_i (log p_i - log q_i), averaged over rows, written out in float64."""
    total = 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist()):
        p = [math.exp(v / t) for v in t_row]
        q = [math.exp(v / t) for v in s_row]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(student)


@pytest.mark.parametrize("temperature, alpha", [(4.0, 0.5), (1.0, 0.9), (2.5, 1.0)])
def test_loss_equals_the_hand_formula(temperature, alpha):
    loss = DistillationLoss(nn.CrossEntropyLoss(), temperature=temperature, alpha=alpha)
    got = loss(STUDENT_LOGITS, LABELS, TEACHER_LOGITS)
    ce = F.cross_entropy(STUDENT_LOGITS, LABELS).item()
    expected = (1 - alpha) * ce + alpha * temperature**2 * _hand_kl(STUDENT_LOGITS, TEACHER_LOGITS, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_the_base_loss_and_soft_targets_pass_through_to_it():
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])  # mixup-style targets
    base = nn.CrossEntropyLoss()
    loss = DistillationLoss(base, alpha=0.0)
    assert torch.equal(loss(STUDENT_LOGITS, soft, TEACHER_LOGITS), base(STUDENT_LOGITS, soft))


def test_gradients_reach_the_student_only():
    student = STUDENT_LOGITS.clone().requires_grad_(True)
    teacher = TEACHER_LOGITS.clone().requires_grad_(True)
    DistillationLoss(nn.CrossEntropyLoss())(student, LABELS, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_bad_loss_settings_raise(kwargs):
    with pytest.raises(UsageError):
        DistillationLoss(nn.CrossEntropyLoss(), **kwargs)


def test_soft_targets_agreement():
    assert soft_targets_agreement(STUDENT_LOGITS, TEACHER_LOGITS) == 0.5
    assert soft_targets_agreement(TEACHER_LOGITS, TEACHER_LOGITS) == 1.0


# digits_run: the session's shared trained-and-exported digits run, copied per module (tests/conftest.py)


DIGITS = [str(i) for i in range(10)]


def test_a_run_and_its_bundle_teach_the_same_logits(digits_run):
    from_run = load_teacher(digits_run, class_names=DIGITS)
    from_bundle = load_teacher(digits_run / "bundle", class_names=DIGITS)
    assert (from_run.kind, from_bundle.kind) == ("run", "bundle")
    # pixels on the 8-bit grid, as images decode: the bundle takes them exactly (it rounds others)
    levels = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    batch = levels.float() / 255
    run_logits, bundle_logits = from_run(batch), from_bundle(batch)
    assert run_logits.shape == (16, 10) and run_logits.dtype == torch.float32
    assert torch.allclose(run_logits, bundle_logits, atol=1e-4)
    # an RGB student at another size is converted (luma, resize) to the teacher's 1x8x8 input
    assert from_bundle(torch.rand(4, 3, 32, 32)).shape == (4, 10)


def test_teacher_logits_work_in_the_student_loss_backward(digits_run):
    teacher = load_teacher(digits_run, class_names=DIGITS)
    student = nn.Linear(64, 10)
    batch = torch.rand(8, 1, 8, 8)
    loss = DistillationLoss(nn.CrossEntropyLoss())(student(batch.flatten(1)), torch.arange(8), teacher(batch))
    loss.backward()  # fails if the teacher's logits were inference tensors or carried a graph
    assert student.weight.grad is not None


def test_grey_8px_student_batch_feeds_a_3_channel_32px_teacher():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean((2, 3))  # one "logit" per channel

    pre = Preprocess(input_size=(32, 32), channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25))
    teacher = Teacher.from_model(Probe(), pre, ["r", "g", "b"])
    constant = torch.full((2, 1, 8, 8), 0.6)
    logits = teacher(constant)
    assert seen[0].shape == (2, 3, 32, 32)
    # a constant image stays constant through an antialiased bilinear resize; each channel is then normalised
    expected = torch.tensor([(0.6 - 0.5) / 0.2, (0.6 - 0.4) / 0.2, (0.6 - 0.3) / 0.25]).expand(2, 3)
    assert torch.allclose(logits, expected, atol=1e-6)


def test_rgb_student_batch_feeds_a_grey_teacher_with_luma():
    pre = Preprocess(input_size=(4, 4), channels=1, mean=(0.0,), std=(1.0,))
    teacher = Teacher.from_model(nn.Flatten(), pre, [str(i) for i in range(16)])
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert torch.allclose(teacher(red), torch.full((1, 16), 0.299))


def test_class_names_must_match_exactly(digits_run):
    with pytest.raises(UsageError, match=r"missing in teacher: 'ten'"):
        load_teacher(digits_run / "bundle", class_names=[*DIGITS[:9], "ten"])
    with pytest.raises(UsageError, match="another order"):
        load_teacher(digits_run, class_names=list(reversed(DIGITS)))


def test_a_path_that_is_neither_run_nor_bundle_is_refused(tmp_path):
    with pytest.raises(UsageError, match="neither a run"):
        load_teacher(tmp_path, class_names=DIGITS)
    with pytest.raises(UsageError, match="no such file"):
        load_teacher(tmp_path / "missing", class_names=DIGITS)

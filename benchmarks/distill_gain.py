"""Knowledge distillation: student trained with a teacher minus the same student alone, equal epochs.

Issue aim ("Deploy under a budget"): at least +1 point of test top-1 for a student that
underfits on its own.

- **teacher**: ``tinycnn_s`` trained well on ``builtin:shapes`` (8,000 images at 32 px, 8 epochs;
  cached in ``--workdir``);
- **student alone** and **student + teacher**: ``tinycnn_xs`` with the same recipe, the same
  epochs and the teacher's split (``splits_file=TEACHER/splits.json``), differing only in
  ``teacher=TEACHER`` (lensforge's ``(1 - a) CE + a T^2 KL`` loss, a = 0.5, T = 4); a short
  budget (3 epochs) is what makes the small student underfit (its train accuracy stays near
  its val accuracy, far below the teacher's). Digits are no good here: ``tinycnn_xs`` fits
  them (98% train accuracy in 6 epochs) and there is little left for a teacher to add;
- every model is exported and scored on the teacher's test split *through its bundle*
  (ONNX Runtime); the gain is computed per seed, and the median over seeds is reported.

    .venv/bin/python benchmarks/distill_gain.py             # full (~6 min)
    .venv/bin/python benchmarks/distill_gain.py --quick     # ~1-minute smoke run
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from lensforge.compress.measure import load_test_set

AIM_GAIN = 1.0  # points of test top-1


def bundle_accuracy(run_dir: Path, test: Any) -> float:
    """Export the run (if not yet) and score its bundle on ``test`` through ONNX Runtime."""
    from lensforge.deploy.bundle import is_bundle
    from lensforge.deploy.from_run import export_run

    bundle = run_dir / "bundle"
    if not is_bundle(bundle):
        export_run(run_dir)
    return test.accuracy(bundle)


def student(args: argparse.Namespace, teacher_dir: Path, seed: int, with_teacher: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"seed": seed, "splits_file": str(teacher_dir / "splits.json"), **args.student_options}
    if with_teacher:
        options["teacher"] = str(teacher_dir)
    recipe = _common.shapes_recipe(args.student, n=args.n, size=args.size, epochs=args.student_epochs, **options)
    run = _common.trained_run(recipe, args.workdir, fresh=True)  # students always retrain: they are the result
    test = load_test_set(run.path)  # the teacher's test split (splits_file), at the student's own input size
    history = [__import__("json").loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    row = {"seed": seed, "teacher": with_teacher, "run": str(run.path), "train_s": run.train_s,
           "final_train_acc": history[-1]["train_acc"], "final_val_acc": history[-1]["val_acc"],
           "best_val_acc": run.best_val_acc, "test_acc_bundle": bundle_accuracy(run.path, test)}
    print(f"  seed {seed} {'student + teacher' if with_teacher else 'student alone    '}: "
          f"test {row['test_acc_bundle']:.2%} (train acc {row['final_train_acc']:.2%}, val "
          f"{row['final_val_acc']:.2%}), {run.train_s:.0f} s", flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1-minute smoke run")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR, help="the teacher run, reused")
    parser.add_argument("--n", type=int, default=8000, help="images generated (70/15/15 split)")
    parser.add_argument("--size", type=int, default=32, help="image side, pixels")
    parser.add_argument("--teacher", default="tinycnn_s")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--student", default="tinycnn_xs")
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="the spread between seeds exceeds the gain: use 5")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.size, args.teacher_epochs, args.student_epochs, args.seeds = 1500, 16, 3, 1, "0"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.student_options = {}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(_common.THREADS)
    info = _common.machine()
    _common.print_header("distill_gain: student + teacher minus student alone, equal epochs", info)
    started = time.perf_counter()
    recipe = _common.shapes_recipe(args.teacher, n=args.n, size=args.size, epochs=args.teacher_epochs)
    teacher = _common.trained_run(recipe, args.workdir)
    test = load_test_set(teacher.path)  # uses the same data-loading as the students' test sets below
    teacher_acc = bundle_accuracy(teacher.path, test)
    print(f"teacher {args.teacher}: {'reused' if teacher.reused else 'trained'} {teacher.path} "
          f"({teacher.epochs} epochs, {teacher.train_s or 0:.0f} s): test {teacher_acc:.2%} through its bundle "
          f"({len(test.targets)} images)", flush=True)
    rows = [student(args, teacher.path, seed, kd) for seed in args.seeds for kd in (False, True)]
    gains = [(kd["test_acc_bundle"] - alone["test_acc_bundle"]) * 100
             for alone, kd in zip(rows[0::2], rows[1::2])]
    median_gain = statistics.median(gains)
    print(f"\n## {args.student} with vs without {args.teacher} as teacher ({args.size} px, "
          f"{args.student_epochs} epochs each, test split through the bundles)")
    print("| seed | student alone | student + teacher | gain (points) | alone: train / val acc |")
    print("|---|---|---|---|---|")
    for alone, kd, gain in zip(rows[0::2], rows[1::2], gains):
        print(f"| {alone['seed']} | {alone['test_acc_bundle']:.2%} | {kd['test_acc_bundle']:.2%} | {gain:+.2f} | "
              f"{alone['final_train_acc']:.2%} / {alone['final_val_acc']:.2%} |")
    print(f"| median | {statistics.median(r['test_acc_bundle'] for r in rows[0::2]):.2%} | "
          f"{statistics.median(r['test_acc_bundle'] for r in rows[1::2]):.2%} | {median_gain:+.2f} | |")
    print(f"teacher {args.teacher}: {teacher_acc:.2%}")
    line = (f"aim: median gain {median_gain:+.2f} points over {len(gains)} seeds (aim >= +{AIM_GAIN:g}): "
            f"{'MET' if median_gain >= AIM_GAIN else 'MISSED'}")
    print("\n" + line)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average now {_common.load_average():.2f}")
    _common.write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                   "teacher": {"run": str(teacher.path), "reused": teacher.reused,
                                               "train_s": teacher.train_s, "test_acc_bundle": teacher_acc},
                                   "students": rows, "gains_points": gains, "median_gain_points": median_gain,
                                   "verdict": line, "wall_s": wall})


if __name__ == "__main__":
    main()

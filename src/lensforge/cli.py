"""The ``lensforge`` command line: a thin Typer shell over the Python API.

Each command parses its options, calls one API function and prints. A
:class:`~lensforge.errors.LensforgeError` becomes a one-line message and exit
code 2 for usage errors (1 otherwise); ``--debug`` shows the traceback.
Heavy modules are imported inside commands so ``lensforge predict`` never
imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from lensforge.defaults import MAX_DROP_POINTS
from lensforge.errors import LensforgeError
from lensforge.serve.config import ServeConfig
from lensforge.stress import attacks_run as attack_defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="lensforge: from raw images to a measured, deployable vision model.\n\n"
                       "Start with [bold]lensforge autopilot[/] (built-in digits data, a few minutes on a CPU).")
err = Console(stderr=True)
out = Console()

DataOpt = Annotated[str | None, typer.Option(
    "--data", "-d", help="builtin:digits, builtin:shapes?n=5000&size=32, a folder (root/<class>/*.png) or a CSV/JSONL manifest.")]


MLFLOW_HELP = ("Log params (the resolved config), per-epoch metrics and the run's files to MLflow at this tracking "
               "URI: a folder or file: URI, sqlite:///mlflow.db or http(s)://SERVER. Needs the 'tracking' extra.")


class BadImage(str, Enum):
    fail = "fail"
    skip = "skip"


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    """Global options."""


@app.command()
def train(
    data: DataOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name ('auto', tinycnn_s, resnet18, tf_efficientnet_lite0, any timm name).")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", help="Run folder to write (runs/NAME).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (e.g. a run's config.yaml); flags override it.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (early stopping may end sooner).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 2e-3 for AdamW at batch 128).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw or sgd.")] = None,
    schedule: Annotated[str | None, typer.Option(help="onecycle, cosine or constant.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side in pixels (default: from model and data).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Weights: a .safetensors/.pth path, 'package' (EfficientNet-Lite0) or 'hub'.")] = None,
    transfer: Annotated[str | None, typer.Option(help="With pretrained weights: probe (default: linear probe on cached features, then top stages first), full, linear or gradual.")] = None,
    augment: Annotated[str | None, typer.Option(help="auto, none, light, strong, augmix, randaugment, trivialaugment or corruptions (robust training).")] = None,
    adv_train: Annotated[str | None, typer.Option(help="Adversarial training: none, pgd (Madry et al.) or fgsm-rs (Wong et al., fast).")] = None,
    adv_eps: Annotated[float | None, typer.Option(help="Adversarial-training L-inf budget in [0, 1] pixel units (default 8/255 = 0.0314).")] = None,
    adv_steps: Annotated[int | None, typer.Option(help="PGD steps for --adv-train pgd (default 7).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (not on norms and biases).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing (default 0.1).")] = None,
    mixup: Annotated[float | None, typer.Option(help="Mixup alpha (0 = off).")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (0 = off).")] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="Keep an EMA of the weights and evaluate it.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (splits, init, order, augmentation).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Distil from this run or bundle (KL to its soft targets + CE).")] = None,
    distill_alpha: Annotated[float | None, typer.Option(help="Weight of the teacher's soft targets (0-1, default 0.5).")] = None,
    distill_temperature: Annotated[float | None, typer.Option(help="Softmax temperature for distillation (default 4).")] = None,
    splits_file: Annotated[str | None, typer.Option(help="Reuse a run's splits.json (e.g. the teacher's) for the same split.")] = None,
    on_bad_image: Annotated[BadImage | None, typer.Option(help="What to do with unreadable images.")] = None,
    on_bad_label: Annotated[BadImage | None, typer.Option(help="Detection data: what to do with a bad label (degenerate or NaN box, unknown class, missing image); each is named either way.")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Also log to TensorBoard.")] = None,
    max_train_batches: Annotated[int | None, typer.Option(help="Cap batches per epoch (smoke tests).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Data-parallel processes through torchrun (DDP); --batch-size stays the global batch.")] = 1,
    time_budget: Annotated[str | None, typer.Option("--time-budget", "-t", help="Wall-clock budget for data loading and training, e.g. 90s, 10m: a pilot measures this machine and the epochs are planned to fit (--epochs is the most).")] = None,
    mlflow: Annotated[str | None, typer.Option("--mlflow", metavar="URI", help=MLFLOW_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a classifier or a detector (the task comes from the data) into a run folder (checkpoints, metrics, health, report)."""
    from lensforge.train import resolve_config
    from lensforge.train.tracking import mlflow_tracking
    from lensforge.utils.io import fresh_dir

    if out_dir is None and not resume and (config is None or "out" not in load_yaml_keys(config)):
        out_dir = str(fresh_dir("runs", "train"))  # never overwrite an earlier run

    cfg = resolve_config(config, data=data, model=model, out=out_dir, epochs=epochs, batch_size=batch_size,
                         lr=lr, optimizer=optimizer, schedule=schedule, image_size=image_size,
                         pretrained=pretrained, transfer=transfer, augment=augment, mixup=mixup, cutmix=cutmix,
                         weight_decay=weight_decay, label_smoothing=label_smoothing, teacher=teacher,
                         distill_alpha=distill_alpha, distill_temperature=distill_temperature, splits_file=splits_file,
                         ema=ema, seed=seed, on_bad_image=on_bad_image.value if on_bad_image else None,
                         on_bad_label=on_bad_label.value if on_bad_label else None,
                         tensorboard=tensorboard, max_train_batches=max_train_batches, adv_train=adv_train,
                         adv_eps=adv_eps, adv_steps=adv_steps)
    if resume and out_dir is None and config is None:
        raise typer.BadParameter("--resume needs --out RUN_FOLDER", param_hint="--resume")
    # the tracking store is opened first: a --mlflow URI that cannot be opened fails before any work
    with mlflow_tracking(mlflow, run_name=Path(cfg.out).name, command="train", console=err) as tracker:
        if time_budget is not None and not resume:
            from lensforge.planning import parse_duration, plan_run

            plan = plan_run(cfg, budget_s=parse_duration(time_budget), include_after=False)
            err.print(plan.describe())
            cfg = resolve_config(None, **{**cfg.model_dump(), "epochs": plan.epochs,
                                          "time_limit_s": plan.train_limit_s})
        if not resume:  # a resumed run's config is its own config.yaml: logged from there at the end
            tracker.log_config(cfg)
        run_dir, best_val_acc, report = train_and_report(cfg, nproc=nproc, resume=resume, quiet=quiet,
                                                         on_epoch_end=tracker.epoch_callback())
        tracker.log_run(run_dir)
    out.print(f"run: {run_dir}  best {primary_metric_text(run_dir, best_val_acc)}  report: {report}")
    for finding in json.loads((Path(run_dir) / "diagnosis.json").read_text()).get("fit", []):
        if finding.get("kind") == "underfitting":  # includes a model at chance level: say it where it is seen
            err.print(f"[yellow]underfitting:[/] {escape(finding['message'])}")


def primary_metric_text(run_dir: Path, value: float) -> str:
    """'val acc 98.5%' for a classifier, 'val mAP 0.613' for a detector (the task's primary metric)."""
    from lensforge.artifacts import resolve_artifact
    from lensforge.tasks import get_task

    return get_task(resolve_artifact(run_dir).task).describe_metric(value, "val")


def train_and_report(cfg: Any, *, nproc: int, resume: bool, quiet: bool,
                     on_epoch_end: Any = None) -> tuple[Path, float, Path]:
    """Train in this process, or in ``nproc`` through torchrun; (run folder, best val accuracy, report)."""
    from lensforge.report import write_report
    from lensforge.train import train as train_api

    if nproc > 1:  # torchrun runs nproc copies of lensforge.train.distributed; rank 0 writes the run
        from lensforge.train.distributed import launch
        from lensforge.train.run import read_run_info

        # no live callback across processes: --mlflow logs the run's metrics.jsonl when it ends
        run_dir = launch(cfg, nproc=nproc, resume=resume, quiet=quiet)
        return run_dir, read_run_info(run_dir)["best_val_acc"], write_report(run_dir)
    result = train_api(cfg, resume=resume, console=err, show_progress=not quiet, on_epoch_end=on_epoch_end)
    return result.run_dir, result.best_val_acc, write_report(result.run_dir)


@app.command("lr-find")
def lr_find(
    config: Annotated[Path | None, typer.Argument(help="A run's config.yaml (or any training config); flags override it.")] = None,
    data: DataOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name (default: the config's, or auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (the learning rate depends on it).")] = None,
    steps: Annotated[int, typer.Option(min=10, help="Optimizer steps from --min-lr to --max-lr.")] = 100,
    min_lr: Annotated[float, typer.Option(help="First learning rate.")] = 1e-6,
    max_lr: Annotated[float, typer.Option(help="Last learning rate (the test stops earlier when the loss diverges).")] = 1.0,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for lr_find.json and lr_find.png.")] = Path("runs/lr-find"),
) -> None:
    """LR range test (Smith 2017): loss against an exponentially growing learning rate, with a suggested peak lr and its plot."""
    from lensforge.train import resolve_config
    from lensforge.train.lr_find import lr_find as lr_find_api

    cfg = resolve_config(config, data=data, model=model, batch_size=batch_size)
    result = lr_find_api(cfg, steps=steps, min_lr=min_lr, max_lr=max_lr, out=out_dir)
    out.print(f"suggested peak learning rate {result.suggested_lr:.3g} for {result.model} at batch {result.batch_size} "
              f"(loss lowest at {result.min_loss_lr:.3g}); train with --lr {result.suggested_lr:.2g}")
    out.print(f"written: {result.path} and {out_dir / 'lr_find.png'}")


@app.command()
def evaluate(
    target: Annotated[Path, typer.Argument(help="Run folder or bundle folder.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics here.")] = None,
    on_bad_image: Annotated[BadImage, typer.Option(help="What to do with unreadable images.")] = BadImage.fail,
) -> None:
    """A classifier's accuracy, macro-F1, per-class scores, confusion matrix, ECE and worst mistakes; a detector's COCO mAP, P/R/F1, PR curves and worst images."""
    from lensforge.evaluate import evaluate as evaluate_api
    from lensforge.tasks import get_task
    from lensforge.utils.io import atomic_write_json

    result = evaluate_api(target, data, split=split, on_bad_image=on_bad_image.value)
    m = result.metrics
    if json_out:
        atomic_write_json(json_out, m)
    lines = get_task(m.get("task", "classification")).describe_evaluation(m)
    if lines is not None:  # the task says it itself
        out.print(f"{m['evaluated']} '{target}' on {m['split']}: " + "\n".join(lines))
        if result.path:
            out.print(f"written: {result.path}")
        return
    uncalibrated = f" ({m['ece_uncalibrated']:.3f} uncalibrated)" if m.get("ece_uncalibrated") is not None else ""
    out.print(f"{m['evaluated']} '{target}' on {m['split']} ({m['num_samples']} images): accuracy {m['accuracy']:.2%}  "
              f"macro-F1 {m['macro_f1']:.3f}  ECE {m['ece']:.3f}{uncalibrated}")
    if m.get("at_chance"):
        from lensforge.evaluate.metrics import chance_message

        err.print(f"[bold red]at chance level:[/] {escape(chance_message(m, 'this model'))}")
    worst = ", ".join(f"{c['name']} (recall {c['recall']:.0%})" for c in m["worst_classes"][:3])
    out.print(f"worst classes: {worst}")
    if result.path:
        out.print(f"written: {result.path}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    format: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    atol: Annotated[float, typer.Option(help="Max |ONNX - PyTorch| logit difference allowed.")] = 1e-3,
    force: Annotated[bool, typer.Option("--force", help="Replace RUN/bundle even when it carries calibration or guardrails (they are lost).")] = False,
) -> None:
    """Export a run to RUN/bundle: model.onnx (uint8 pixels in; logits + features out) and manifest.json.

    A bundle that already carries calibration or guardrails (as autopilot ships it) is never
    replaced silently: the command refuses unless --force.
    """
    from lensforge.deploy.from_run import export_run

    if format != "onnx":
        raise typer.BadParameter(f"unknown format {format!r} (only onnx for now)", param_hint="--format")
    bundle = export_run(run, atol=atol, force=force, show_progress=True)
    out.print(f"bundle: {bundle}")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="BUNDLE then image files or folders; with --url, only images.", metavar="[BUNDLE] IMAGES...")],
    url: Annotated[str | None, typer.Option(help="Classify on a running `lensforge serve` at this URL instead of a local bundle.")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="With --url: environment variable holding the server's API key.")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to list per image.")] = 5,
    on_bad_image: Annotated[BadImage, typer.Option(help="What to do with unreadable images.")] = BadImage.fail,
) -> None:
    """Predict with ONNX Runtime only (no torch), locally or on a server; prints one JSON line per image (with guardrail flags when the bundle has them)."""
    if url is not None:
        from lensforge.client import predict_remote

        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise typer.BadParameter(f"environment variable {api_key_env} is not set", param_hint="--api-key-env")
        rows = predict_remote(url, paths, api_key=key, top_k=top_k, on_bad_image=on_bad_image.value)
    else:
        from lensforge.deploy.bundle import load_bundle
        from lensforge.deploy.predict import predict_files

        if len(paths) < 2:
            raise typer.BadParameter("give a bundle and at least one image (or --url URL and images)",
                                     param_hint="PATHS")
        rows = predict_files(load_bundle(paths[0]), paths[1:], top_k=top_k, on_bad_image=on_bad_image.value)
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")


@app.command()
def bench(
    target: Annotated[Path, typer.Argument(help="Run folder or bundle folder.")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="Comma-separated: torch, onnxruntime, openvino.")] = "torch,onnxruntime",
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")] = "1,8,32",
    threads: Annotated[int | None, typer.Option(min=1, help="Threads for every backend (default: usable cores).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON (default for a run: RUN/bench.json).")] = None,
) -> None:
    """Latency p50/p90/p99, throughput, size, params, FLOPs, peak memory and GFLOP/s vs this CPU's peak."""
    from lensforge.deploy.bench import benchmark, parse_batches

    backends = tuple(b.strip() for b in backend.split(",") if b.strip())
    result = benchmark(target, backends=backends, batches=parse_batches(batch), threads=threads)
    out.print(result.table())
    for note in result.notes:
        out.print(f"[dim]note: {note}[/]")
    from lensforge.artifacts import resolve_artifact

    run_dir = resolve_artifact(target).run_dir
    path = json_out or (run_dir / "bench.json" if run_dir else None)
    if path:
        result.write_json(path)
        out.print(f"written: {path}")


@app.command()
def compress(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    prune: Annotated[float | None, typer.Option(help="Share of channels to remove per layer (0-1), then fine-tune.")] = None,
    prune_steps: Annotated[int, typer.Option(min=1, help="Iterative pruning: steps to reach the ratio.")] = 1,
    round_to: Annotated[int | None, typer.Option(min=1, help="Keep pruned channel counts multiples of this (e.g. 16): ONNX Runtime runs odd widths slowly.")] = None,
    distill: Annotated[bool, typer.Option("--distill", help="Fine-tune the pruned model against the unpruned one.")] = False,
    teacher: Annotated[str | None, typer.Option(help="Distil from this run or bundle instead.")] = None,
    quantize: Annotated[str | None, typer.Option(help="Comma-separated: int8, fp16 (ONNX Runtime).")] = None,
    max_drop: Annotated[float | None, typer.Option(help=f"Accuracy points a variant may lose vs its parent (default {MAX_DROP_POINTS:g}).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Compress even a parent that scores at chance level.")] = False,
    finetune_epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs after pruning.")] = 5,
    calibration_method: Annotated[str, typer.Option(help="INT8 calibration: minmax, entropy or percentile.")] = "minmax",
) -> None:
    """Pruned, distilled and quantized variants in RUN/variants/, each guarded on its ONNX artifact."""
    from lensforge.compress.variants import CompressConfig
    from lensforge.compress.variants import compress as compress_api
    from lensforge.report import write_report
    from lensforge.train.config import make_config_of

    kinds = tuple(k.strip() for k in quantize.split(",") if k.strip()) if quantize else ()
    cfg = make_config_of(CompressConfig, given(prune=prune, prune_steps=prune_steps, round_to=round_to, distill=distill,
                                               teacher=teacher, quantize=kinds, max_drop=max_drop,
                                               finetune_epochs=finetune_epochs, calibration_method=calibration_method,
                                               allow_chance_parent=force))
    result = compress_api(run, cfg, console=err)
    table, reasons = variants_table(result.variants)
    out.print(table)
    for line in reasons:
        out.print(line, soft_wrap=False)
    out.print(f"report: {write_report(run)}")


def given(**values: object) -> dict[str, object]:
    """The options the user gave (None = not given), so a config model's own defaults apply."""
    return {k: v for k, v in values.items() if v is not None}


def variants_table(variants: list) -> tuple[object, list[str]]:
    """The variants as a table that fits 80 columns, and the rejection reasons as lines to print under it."""
    from rich.table import Table

    table = Table(title="variants (accuracy through ONNX Runtime, latency side by side at batch 1)")
    for column in ("variant", "accuracy", "vs parent", "p50 ms", "p99 ms", "MB", "speed-up", "status"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("variant", "status") else "right")
    reasons = []
    for v in variants:
        drop = "" if v.drop_points is None else f"{-v.drop_points:+.2f} pt"
        speed = "" if v.speedup is None else f"{v.speedup:.2f}x"
        if v.status == "accepted":
            status = "[green]accepted[/]"
        else:
            reasons.append(f"[yellow]{v.name} rejected[/]: {escape(v.reason)}")
            status = f"[yellow]rejected ({len(reasons)})[/]"
            reasons[-1] = f"({len(reasons)}) " + reasons[-1]
        table.add_row(v.name, f"{v.metrics['accuracy']:.2%}", drop, f"{v.latency_ms['p50']:.3f}",
                      f"{v.latency_ms['p99']:.3f}", f"{v.size_mb:.2f}", speed, status)
    return table, reasons


@app.command()
def select(
    data: DataOpt = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Budget: p50 latency of one image on this machine (ms).")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="Budget: model file size (MB).")] = None,
    max_drop: Annotated[float | None, typer.Option(help=f"Accuracy points a compressed variant may lose vs its parent (default {MAX_DROP_POINTS:g}).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Keep candidates that trained to chance level (refused by default).")] = False,
    candidates: Annotated[str | None, typer.Option(help="e.g. 'tinycnn_s@16,tinycnn_m@32' (default: chosen from the data).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per candidate.")] = 15,
    prune: Annotated[float | None, typer.Option(help="Also try a pruned variant of each candidate (ratio).")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", help="Output folder (default runs/select, -2, ...).")] = None,
) -> None:
    """Train candidates, compress, measure on this machine, and pick the best artifact within the budget."""
    from lensforge.select import Budget, parse_candidates
    from lensforge.select import select as select_api
    from lensforge.train.config import make_config_of

    budget = make_config_of(Budget, given(max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, max_drop=max_drop))
    result = select_api(data or "builtin:digits", budget, out=out_dir, epochs=epochs, prune=prune,
                        candidates=parse_candidates(candidates) if candidates else None, console=err,
                        allow_chance=force)
    chosen = result.chosen
    out.print(f"picked {chosen.candidate}/{chosen.variant}: accuracy {chosen.accuracy:.2%}, "
              f"{chosen.latency_ms:.3g} ms p50, {chosen.size_mb:.2f} MB -> {chosen.bundle}")
    out.print(f"all measurements: {result.out / 'selection.json'}")


@app.command()
def report(run: Annotated[Path, typer.Argument(help="Run folder.")]) -> None:
    """(Re)write RUN/report.html from the run's files."""
    import lensforge.tune.section  # noqa: F401  (registers the Tuning section: a run tune made shows it)
    from lensforge.report import write_report
    from lensforge.train.run import read_run_info

    read_run_info(run)
    out.print(f"report: {write_report(run)}")


class Pruner(str, Enum):
    median = "median"
    hyperband = "hyperband"
    none = "none"


@app.command()
def tune(
    data: DataOpt = None,
    model: Annotated[str, typer.Option("--model", "-m", help="'auto' (TinyCNN sizes searched for small images) or a model name (kept fixed).")] = "auto",
    trials: Annotated[int, typer.Option(help="Trials the study should have (finished ones already in the storage count).")] = 20,
    timeout: Annotated[str | None, typer.Option(help="Start no trial after this long: 90s, 30m, 1h or plain seconds.")] = None,
    objectives: Annotated[str, typer.Option(help="accuracy, or accuracy with latency_ms and/or size_mb (then a Pareto front).")] = "accuracy",
    study: Annotated[str | None, typer.Option(help="Study name (default: the --out folder's name); processes with the same name and storage share it.")] = None,
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL (sqlite:///tune.db, postgresql://...) or journal file (default OUT/study.journal).")] = None,
    pruner: Annotated[Pruner, typer.Option(help="Stop trials that fall behind after each epoch (single objective only).")] = Pruner.median,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per trial (default 10).")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed and every trial's training seed (one split for all).")] = 0,
    max_train_batches: Annotated[int | None, typer.Option(min=1, help="Cap batches per epoch (smoke tests).")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", help="Study folder (default runs/tune, -2, ...); the same --out resumes.")] = None,
) -> None:
    """Tune training hyperparameters with Optuna; writes best.yaml, trials.csv, tune.json and the best run and bundle."""
    from lensforge.errors import UsageError
    from lensforge.tune import parse_duration
    from lensforge.tune import tune as tune_api

    if trials < 1:
        raise UsageError(f"--trials: {trials} is not at least 1")
    result = tune_api(data or "builtin:digits", model=model, trials=trials, timeout_s=parse_duration(timeout),
                      objectives=objectives, study=study, storage=storage, pruner=pruner.value, seed=seed,
                      max_train_batches=max_train_batches, out=out_dir, console=err, **given(epochs=epochs))
    out.print(result.table())
    for line in result.summary_lines():
        out.print(line, soft_wrap=True)


@app.command()
def autopilot(
    data: DataOpt = None,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", help="Output folder (default runs/autopilot, runs/autopilot-2, ...).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Model name or 'auto'.")] = "auto",
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    max_latency_ms: Annotated[float | None, typer.Option(help="Budget: p50 latency of one image on this machine (ms); turns on candidate selection.")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="Budget: model file size (MB).")] = None,
    max_drop: Annotated[float | None, typer.Option(help=f"Accuracy points a compressed variant may lose vs its parent (default {MAX_DROP_POINTS:g}).")] = None,
    no_guardrails: Annotated[bool, typer.Option("--no-guardrails", help="Skip calibration, OOD/quality guardrails and the quick stress suite.")] = False,
    time_budget: Annotated[str | None, typer.Option("--time-budget", "-t", help="Wall-clock budget for the whole chain, e.g. 90s, 10m, 1h (default: what the data needs, 1-5 min); a pilot measures this machine and the epochs are planned to fit.")] = None,
    tune: Annotated[int | None, typer.Option("--tune", metavar="N", help="First run N Optuna trials inside the time budget (as much time as the final training: half of a --time-budget's training time, else added to the default budget), re-check the best against the default on a second seed, and train the final model with it only if it holds there. Needs the 'tune' extra.")] = None,
    mlflow: Annotated[str | None, typer.Option("--mlflow", metavar="URI", help=MLFLOW_HELP + " For autopilot also the bundle and summary.json.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The main job: split, pick a model, train, export, evaluate the bundle, ship its guardrails, stress it, report. No arguments needed.

    With a budget (--max-latency-ms / --max-size-mb / --max-drop) it trains several candidates,
    compresses them, measures every artifact on this machine and ships the best one that fits.
    With --tune N it tunes the training options first, inside the time budget.
    """
    from lensforge.autopilot import autopilot as autopilot_api
    from lensforge.planning import parse_duration
    from lensforge.select import Budget
    from lensforge.train.config import make_config_of

    budget = None
    if max_latency_ms is not None or max_size_mb is not None or max_drop is not None:
        budget = make_config_of(Budget, given(max_latency_ms=max_latency_ms, max_size_mb=max_size_mb,
                                              max_drop=max_drop))
    result = autopilot_api(data, out_dir, model=model, epochs=epochs, seed=seed, console=err,
                           show_progress=not quiet, budget=budget, guardrails=not no_guardrails,
                           time_budget_s=parse_duration(time_budget), tune_trials=tune, mlflow_uri=mlflow)
    for line in result.summary_lines():
        out.print(line)
    result.raise_if_failed()


class Suite(str, Enum):
    quick = "quick"
    full = "full"


@app.command()
def stress(
    target: Annotated[Path, typer.Argument(help="Bundle (measured through ONNX Runtime) or run folder (PyTorch).")],
    data: DataOpt = None,
    suite: Annotated[Suite, typer.Option(help="quick: ~25 corruption/severity pairs; full: 28 corruptions x 5 severities.")] = Suite.quick,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    reference: Annotated[Path | None, typer.Option(help="Run or bundle to normalise by: adds mCE and relative mCE.")] = None,
    compare: Annotated[list[Path] | None, typer.Option(help="Other bundles on the same corrupted images (default: the run's int8 variants). Repeatable.")] = None,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="Do not add the run's int8 variants.")] = False,
    max_images: Annotated[int | None, typer.Option(min=10, help="Stress a seeded subset of this many images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the corruptions' random draws.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Accuracy under 28 corruptions and shifts (noise, blur, weather, digital, viewpoint, lighting, occlusion) x 5 severities, mCE, int8-vs-fp32 gap, prediction stability."""
    from lensforge.stress.suite import StressConfig
    from lensforge.stress.suite import stress as stress_api
    from lensforge.train.config import make_config_of

    cfg = make_config_of(StressConfig, dict(suite=suite.value, split=split, max_images=max_images, seed=seed))
    others = [] if no_compare else compare
    result = stress_api(target, data, cfg=cfg, reference=reference, compare=others, json_out=json_out,
                        show_progress=not quiet)
    table, lines = stress_table(result.summary)
    out.print(table)
    for line in lines:
        out.print(line)
    if result.path:
        out.print(f"written: {result.path}")


def stress_table(s: dict) -> tuple[object, list[str]]:
    """Accuracy per corruption and severity (fits 80 columns), and the summary lines to print under it."""
    from rich.table import Table

    table = Table(title=f"{s['target']} on {s['num_images']} {s['split']} images of {s['data']} "
                        f"(clean accuracy {s['clean_accuracy']:.1%})")
    severities = [str(v) for v in s["severities"]]
    for name in ("corruption", "family", *(f"s{v}" for v in severities), "mean"):
        table.add_column(name, justify="left" if name in ("corruption", "family") else "right")
    for name, entry in s["corruptions"].items():
        accs = [entry["accuracy"].get(v) for v in severities]
        table.add_row(name, entry["family"], *("-" if a is None else f"{a:.0%}" for a in accs),
                      f"{1 - entry['error_mean']:.1%}")
    lines = [f"mean corruption error {s['mean_corruption_error']:.1%}"]
    if s.get("mce") is not None:
        lines.append(f"mCE {s['mce']:.1%}, relative mCE {s['relative_mce']:.1%} (vs {s['reference']['target']})")
    for other in s.get("compare", []):
        gap = other["gap"]
        lines.append(f"{other['precision']} {other['target']}: loses {gap['mean_points']:+.2f} points under corruption "
                     f"({gap['clean_points']:+.2f} clean), worst {gap['worst']}")
    stability = s.get("stability", {}).get("target")
    if stability:
        lines.append(f"prediction flips: {stability['translate_flip_rate']:.1%} under 1-2 px shifts, "
                     f"{stability['jitter_flip_rate']:.1%} under photometric jitter")
    return table, lines


def parse_epsilons(text: str) -> list[float]:
    """``"0,1/255,0.5"`` -> floats; fractions of the pixel range, each in [0, 1]."""
    from fractions import Fraction

    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            values.append(float(Fraction(part)))
        except (ValueError, ZeroDivisionError):
            raise typer.BadParameter(f"{part!r} is not a number or fraction like 8/255", param_hint="--epsilons") from None
    if not values:
        raise typer.BadParameter("give at least one epsilon", param_hint="--epsilons")
    return values


@app.command()
def attack(
    target: Annotated[Path, typer.Argument(help="Run folder, or a bundle inside one (its PyTorch model is attacked; the bundle gets the transferred images).")],
    data: DataOpt = None,
    attacks: Annotated[str, typer.Option(help="Comma-separated: fgsm, pgd-linf, pgd-l2, apgd-ce.")] = ",".join(attack_defaults.DEFAULT_ATTACKS),
    epsilons: Annotated[str, typer.Option(help="L-inf budgets as fractions of the pixel range, e.g. 0,1/255,2/255,4/255,8/255.")] = ",".join(
        "0" if e == 0 else f"{round(e * 255)}/255" for e in attack_defaults.DEFAULT_EPSILONS),
    steps: Annotated[int, typer.Option(min=1, help="Iterations of PGD / APGD.")] = attack_defaults.DEFAULT_STEPS,
    restarts: Annotated[int, typer.Option(min=1, help="Random restarts (worst case per image is kept).")] = attack_defaults.DEFAULT_RESTARTS,
    split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    max_images: Annotated[int, typer.Option(min=1, help="Attack a seeded subset of this many images.")] = attack_defaults.DEFAULT_MAX_IMAGES,
    seed: Annotated[int, typer.Option(help="Seed of random starts.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
) -> None:
    """Adversarial robustness: robust accuracy against epsilon (FGSM, PGD L-inf/L2 with restarts, APGD-CE), with gradient-masking warnings."""
    from lensforge.stress.attacks_run import adversarial

    names = [a.strip() for a in attacks.split(",") if a.strip()]
    result = adversarial(target, data, split=split, attacks=names, epsilons=parse_epsilons(epsilons), steps=steps,
                         restarts=restarts, max_images=max_images, seed=seed, json_out=json_out)
    out.print(f"clean accuracy {result['clean_accuracy']:.1%} on {result['settings']['num_samples']} images")
    for name, curve in result["attacks"].items():
        scale, unit = (255, "/255") if curve["norm"] == "linf" else (1, "")
        points = "  ".join(f"{eps * scale:g}{unit}: {acc:.1%}" for eps, acc in zip(curve["epsilons"], curve["robust_accuracy"]))
        out.print(f"{name:<9} {points}")
    for name, row in (result.get("transfer") or {}).items():
        points = "  ".join(f"{eps * 255:g}/255: {acc:.1%}" for eps, acc in zip(row["epsilons"], row["bundle"]))
        out.print(f"{name:<9} on the bundle (8-bit images): {points}")
    for warning in result["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}")


@app.command()
def calibrate(
    target: Annotated[Path, typer.Argument(help="Bundle, or run folder (its bundle).")],
    data: DataOpt = None,
) -> None:
    """Temperature scaling on the validation split; the temperature goes into the bundle and predict uses it."""
    from lensforge.stress.calibration import calibrate as calibrate_api

    result = calibrate_api(target, data)
    held_out = result.summary.get("test", result.summary["val"])
    which = "test" if "test" in result.summary else "val"
    out.print(f"temperature {result.temperature:.3f} (fitted on val): ECE on {which} "
              f"{held_out['before']['ece']:.3f} -> {held_out['after']['ece']:.3f}, "
              f"NLL {held_out['before']['nll']:.3f} -> {held_out['after']['nll']:.3f}; stored in {result.summary['bundle']}")
    if result.path:
        out.print(f"written: {result.path}")


@app.command()
def adapt(
    run: Annotated[Path, typer.Argument(help="Run folder trained on the source domain (never modified).")],
    target: Annotated[str, typer.Option("--target", "-t", help="Data of the new domain, e.g. 'builtin:shapes?domain=shifted&seed=1' or a folder.")],
    method: Annotated[str, typer.Option(help="bn (BatchNorm statistics), tent (entropy minimisation), pseudo-label (self-training) or finetune (needs --labels).")] = "bn",
    labels: Annotated[int, typer.Option(min=0, help="Labelled target images for finetune (stratified, seeded).")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="New run folder (default RUN-adapted-METHOD).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override the method's epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override the method's learning rate.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the target split and the updates.")] = 0,
) -> None:
    """Test-time / domain adaptation: accuracy on the target before and after (and on the source), adapted run + bundle."""
    from lensforge.stress.adapt import adapt as adapt_api

    result = adapt_api(run, target, method=method, labels=labels, out=out_dir, epochs=epochs, lr=lr, seed=seed,
                       progress=lambda line: err.print(line))
    for line in result.summary_lines():
        out.print(line)


@app.command()
def guard(
    target: Annotated[Path, typer.Argument(help="Bundle, or run folder (its bundle).")],
    data: DataOpt = None,
    detector: Annotated[str, typer.Option(help="auto (best mean AUROC on validation), msp, energy, mahalanobis, vim or knn.")] = "auto",
    ood_sets: Annotated[str | None, typer.Option(help="Comma-separated OOD sets to choose on (see `lensforge list ood-sets`).")] = None,
    n_ood: Annotated[int, typer.Option(min=16, help="Images per OOD set.")] = 256,
    target_risk: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Error rate the abstain threshold aims for (default: half the validation error, at least 1%).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of OOD sets and subsamples.")] = 0,
) -> None:
    """Fit the bundle's guardrails: OOD detector + threshold, input-quality checks, abstain threshold (predict then flags each image)."""
    from lensforge.stress.ood import DEFAULT_OOD_SETS, fit_guardrails

    sets = [x.strip() for x in ood_sets.split(",") if x.strip()] if ood_sets else DEFAULT_OOD_SETS
    r = fit_guardrails(target, data, detector=detector, ood_sets=sets, n_ood=n_ood, target_risk=target_risk, seed=seed)
    out.print(guard_table(r))
    abstain = r["abstain"]["validation"]
    gain = r.get("gain_over_msp_auroc_points")
    out.print(f"shipped: {r['chosen']} (threshold {r['threshold']:.4g}, keeps 95% of in-distribution images)"
              + (f", {gain:+.1f} AUROC points over max-softmax" if gain is not None else "")
              + f"; abstain below confidence {r['abstain']['threshold']:.3f} "
              f"({abstain['coverage']:.0%} coverage, {abstain['risk']:.2%} error on validation); "
              f"quality flags on in-distribution images {r['quality']['flag_rate_in_distribution']['any']:.1%}")
    out.print(f"bundle: {r['bundle']}")


def guard_table(r: dict) -> object:
    """One row per detector (mean AUROC, mean FPR at 95% TPR, hardest OOD set): fits 80 columns.

    The per-set numbers are in RUN/stress/ood.json and the report.
    """
    from rich.table import Table

    table = Table(title=f"OOD detectors on the {r['split']} split of {r['data']}")
    for name in ("detector", "mean AUROC", "mean FPR95", "hardest OOD set (AUROC)"):
        table.add_column(name, no_wrap=True, justify="left" if name.startswith(("detector", "hardest")) else "right")
    for det, entry in r["detectors"].items():
        hardest = min(entry["auroc"], key=entry["auroc"].get)
        mean_fpr = sum(entry["fpr95"].values()) / max(1, len(entry["fpr95"]))
        table.add_row(det + (" ✓" if det == r["chosen"] else ""), f"{entry['mean_auroc']:.3f}", f"{mean_fpr:.2f}",
                      f"{hardest} ({entry['auroc'][hardest]:.3f})")
    return table


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (e.g. runs/autopilot/bundle).")],
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local (use 0.0.0.0 only behind a proxy/firewall).")] = ServeConfig.model_fields["host"].default,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = ServeConfig.model_fields["port"].default,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each loads the bundle and batches on its own).")] = ServeConfig.model_fields["workers"].default,
    api_key_env: Annotated[str | None, typer.Option(help="Name of an environment variable holding the API key; then every route but /healthz and /readyz needs it.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest micro-batch.")] = ServeConfig.model_fields["max_batch"].default,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest a request waits for others to join its batch.")] = ServeConfig.model_fields["max_wait_ms"].default,
    queue_size: Annotated[int, typer.Option(min=1, help="Images waiting at most; beyond it requests get 503 + Retry-After.")] = ServeConfig.model_fields["queue_size"].default,
) -> None:
    """Serve the bundle over HTTP: batched ONNX Runtime inference with guardrail flags, drift monitoring and Prometheus metrics."""
    from lensforge.serve import make_serve_config, run_server  # torch-free: the serving path never imports torch

    run_server(bundle, make_serve_config(dict(host=host, port=port, workers=workers, api_key_env=api_key_env,
                                              max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size)))


class Kind(str, Enum):
    models = "models"
    sources = "sources"
    tasks = "tasks"
    corruptions = "corruptions"
    attacks = "attacks"
    ood_detectors = "ood-detectors"
    ood_sets = "ood-sets"
    adaptation_methods = "adaptation-methods"
    backends = "backends"


data_app = typer.Typer(no_args_is_help=True, help="Data tools: convert detection labels between formats.")
app.add_typer(data_app, name="data")


class LabelFormat(str, Enum):
    coco = "coco"
    yolo = "yolo"
    voc = "voc"
    labelstudio = "labelstudio"


@data_app.command("convert")
def data_convert(
    src: Annotated[str, typer.Argument(help="Detection data: a COCO/YOLO/VOC/Label Studio folder or file, a boxes CSV, or builtin:shapes?task=detect.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder to write (must not exist or be empty).")],
    to: Annotated[LabelFormat, typer.Option("--to", help="Format to write.")],
    on_bad_label: Annotated[BadImage, typer.Option(help="What to do with a bad label (each is named either way).")] = BadImage.fail,
) -> None:
    """Convert detection labels (and copy the images) into another format; the source is never changed."""
    from lensforge.data.convert import convert_boxes

    done = convert_boxes(src, to.value, out_dir, on_bad_label=on_bad_label.value)
    splits = ", ".join(f"{name} {count}" for name, count in (done.get("splits") or {}).items())
    out.print(f"written: {out_dir} ({to.value}): {done['images']} images ({done['negatives']} without objects), "
              f"{done['boxes']} boxes, {done['classes']} classes" + (f"; splits: {splits}" if splits else ""))
    for problem in done.get("problems") or []:
        err.print(f"[yellow]skipped[/] {escape(str(problem.get('reason', problem)))}")


@app.command("list")
def list_cmd(
    kind: Annotated[Kind, typer.Argument(help="What to list.")],
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'resnet*'.")] = "*",
    task: Annotated[str, typer.Option(help="With models: classify (timm and ours) or detect (our detectors).")] = "classify",
) -> None:
    """List registered models, data sources, tasks, corruptions, attacks, OOD detectors and sets, adaptation methods, backends."""
    if kind is Kind.backends:
        out.print(backends_table(pattern))
        return
    names = _registry_of(kind).list(pattern) if kind not in (Kind.models, Kind.sources) else None
    if kind is Kind.models and task in ("detect", "detection"):
        from lensforge.models.detector import list_detectors

        names = list_detectors(pattern)
    elif kind is Kind.models:
        if task not in ("classify", "classification"):
            raise typer.BadParameter(f"{task!r}: use classify or detect", param_hint="--task")
        from lensforge.models import list_models

        names = list_models(pattern)
    elif kind is Kind.sources:
        from lensforge.data import list_sources

        names = list_sources(pattern)
    out.print("\n".join(names) if names else f"no {kind.value} match {pattern!r}")


def backends_table(pattern: str = "*") -> object:
    """Inference backends of `lensforge bench`: installed or not, with their versions."""
    import fnmatch

    from rich.table import Table

    from lensforge.deploy.bench import backend_status

    table = Table(title="inference backends (lensforge bench --backend NAME)")
    for column in ("backend", "available", "version", "runs"):
        table.add_column(column)
    for row in backend_status():
        if fnmatch.fnmatch(row["name"], pattern):
            table.add_row(row["name"], "[green]yes[/]" if row["available"] else "[red]no[/]", row["version"] or "-",
                          escape(row["note"]))
    return table


def _registry_of(kind: Kind) -> object:
    if kind is Kind.tasks:
        from lensforge.tasks import TASKS as registry
        from lensforge.tasks import list_tasks

        list_tasks()  # registers the built-in tasks
    elif kind is Kind.corruptions:
        from lensforge.ops.corruptions import CORRUPTIONS as registry
    elif kind is Kind.attacks:
        from lensforge.ops.attacks import ATTACKS as registry
    elif kind is Kind.ood_detectors:
        from lensforge.stress.ood import OOD_DETECTORS as registry
    elif kind is Kind.ood_sets:
        from lensforge.stress.ood import OOD_SETS as registry
    else:
        from lensforge.stress.adapt import ADAPT_METHODS as registry
    return registry


def load_yaml_keys(path: Path) -> set[str]:
    from lensforge.train.config import load_config_file

    return set(load_config_file(path))


def quiet_cpu_threads() -> None:
    """Make idle OpenMP threads sleep instead of spin (unless the user chose otherwise).

    With spinning threads, one other busy process on a 2-core machine slows torch's
    small-kernel training by ~20x (measured: 68 vs 1,125 images/s for TinyCNN); with
    passive waiting it loses a few percent at most. Must run before torch is imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    """Console entry point: run the app, turning our errors into one-line messages."""
    quiet_cpu_threads()
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except LensforgeError as e:
        if debug:
            raise
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except ModuleNotFoundError as e:
        extra = _EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None or debug:
            raise
        hint = escape(f"pip install 'lensforge[{extra}]'")  # brackets are rich markup otherwise
        err.print(f"[red]error:[/] this command needs {e.name}, which comes with the '{extra}' extra: {hint}",
                  highlight=False, soft_wrap=True)
        sys.exit(2)


# third-party modules of the optional extras, for a one-line install hint when one is missing
_EXTRA_OF = {name: "train" for name in ("torch", "torchvision", "timm", "torchmetrics", "onnx", "onnxscript", "yaml",
                                         "jinja2", "matplotlib", "sklearn", "scipy", "safetensors", "torch_pruning",
                                         "pytorch_ood")}
_EXTRA_OF.update({name: "serve" for name in ("fastapi", "starlette", "uvicorn", "prometheus_client", "multipart")})
_EXTRA_OF["optuna"] = "tune"
_EXTRA_OF["mlflow"] = "tracking"


if __name__ == "__main__":
    main()

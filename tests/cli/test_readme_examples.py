"""Every command example in the README runs through the console entry point without a traceback.

The README's examples are read from the file itself (``lensforge ...`` lines in code blocks and
the first column of the command table). Each maps to a concrete, tiny version of itself below;
an example without a mapping fails ``test_every_readme_example_has_a_test``, so a documented
command cannot go untested or break unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import LENSFORGE, run, write_image_folder

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.slow


def readme_examples(text: str | None = None) -> list[str]:
    """``lensforge ...`` commands in the README's code blocks and in its command table's first column."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found, in_block = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and line.strip().startswith("lensforge "):
            found.append(line.split("  #")[0].strip())
        cell = re.match(r"\|\s*(`lensforge[^|]*?)\s*\|", line)
        if cell:
            found.extend(re.findall(r"`(lensforge [^`]*)`", cell.group(1)))
    return list(dict.fromkeys(found))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ok(result: subprocess.CompletedProcess, *codes: int) -> subprocess.CompletedProcess:
    allowed = codes or (0,)
    assert result.returncode in allowed, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the README's first command, `lensforge autopilot`, has run (2 epochs to stay quick)."""
    root = tmp_path_factory.mktemp("readme")
    result = _ok(run("autopilot", "--epochs", "2", "-q", cwd=root))
    (root / "autopilot.out").write_text(result.stdout)
    assert (root / "runs" / "autopilot" / "bundle" / "manifest.json").exists()
    return root


@pytest.fixture
def plain(digits_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's trained and exported digits run (no guardrails)."""
    return Path(shutil.copytree(digits_run, tmp_path / "plain"))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _autopilot(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    """The workspace fixture ran `lensforge autopilot` itself; check what it printed and shipped."""
    printed = (workspace / "autopilot.out").read_text()
    assert "runs/autopilot" in printed and "mean corruption error" in printed
    # the summary's ECE is the shipped bundle's (temperature applied), the uncalibrated one beside it
    summary = json.loads((workspace / "runs" / "autopilot" / "summary.json").read_text())
    test, guards = summary["metrics"]["test"], summary["guardrails"]
    assert test["temperature"] == pytest.approx(guards["temperature"])
    assert test["ece"] == pytest.approx(guards["ece_after"], abs=1e-3)
    assert test["ece_uncalibrated"] == pytest.approx(guards["ece_before"], abs=1e-3)
    assert f"ECE {test['ece']:.3f} calibrated ({test['ece_uncalibrated']:.3f} before)" in printed


def _autopilot_folder(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    write_image_folder(tmp_path / "path" / "to" / "images", classes=("ok", "scratch", "dent"), per_class=12, size=16)
    _ok(run("autopilot", "--data", "path/to/images", "--out", "runs/parts", "--epochs", "2", "-q", cwd=tmp_path), 0, 4)
    assert (tmp_path / "runs" / "parts" / "summary.json").exists()


def _autopilot_time_budget(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    write_image_folder(tmp_path / "path" / "to" / "images", classes=("ok", "scratch"), per_class=40, size=16)
    result = _ok(run("autopilot", "--data", "path/to/images", "--time-budget", "10m", "-q", cwd=tmp_path), 0, 4)
    summary = json.loads((tmp_path / "runs" / "autopilot" / "summary.json").read_text())
    assert summary["budget_s"] == 600 and summary["plan"]["budget_given"]
    assert "budget" in result.stdout


def _autopilot_tune(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    """`--tune` and `--mlflow` together in miniature: 2 trials of 1 epoch within the README's 20 min budget."""
    write_image_folder(tmp_path / "path" / "to" / "images", classes=("ok", "scratch"), per_class=40, size=16)
    result = _ok(run("autopilot", "--data", "path/to/images", "--time-budget", "20m", "--tune", "2", "--epochs", "1",
                     "--no-guardrails", "--mlflow", "file:./mlruns", "-q", cwd=tmp_path), 0, 4)
    out = tmp_path / "runs" / "autopilot"
    summary = json.loads((out / "summary.json").read_text())
    tune = summary["tune"]
    assert summary["budget_s"] == tune["budget_split_s"]["total"] == 1200 and tune["trials_run"] == 2
    assert (out / "tune" / "best.yaml").is_file() and "tuning: 2 of 2 trials" in result.stdout
    assert "tuning first: up to 2 trials" in result.stderr
    assert len(list((tmp_path / "mlruns").rglob("bundle/manifest.json"))) == 1  # the bundle, as MLflow artifacts


def _autopilot_shapes(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("autopilot", "--data", "builtin:shapes?n=300&size=16", "--epochs", "1", "--no-guardrails", "-q",
            cwd=tmp_path), 0, 4)
    summary = json.loads((tmp_path / "runs" / "autopilot" / "summary.json").read_text())
    assert summary["data"].startswith("builtin:shapes")


def _detection_autopilot(data: str, out: Path, cwd: Path) -> None:
    _ok(run("autopilot", "--data", data, "--time-budget", "8s", "--no-guardrails", "--out", str(out), "-q",
            cwd=cwd), 0, 4)  # 4: a detector that found almost nothing in 8 s, said so
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "detection" and "map50" in summary["metrics"]["test"]
    assert (out / "bundle" / "model.onnx").exists() and (out / "report.html").exists()


def _autopilot_detection_folder(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    from lensforge.data.convert import convert_boxes

    convert_boxes("builtin:shapes?task=detect&n=60&size=48", "voc", tmp_path / "voc")
    _detection_autopilot(str(tmp_path / "voc"), tmp_path / "ap", tmp_path)


def _autopilot_detection_shapes(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _detection_autopilot("builtin:shapes?task=detect&n=60&size=48", tmp_path / "ap", tmp_path)


def _data_convert(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    spec = "builtin:shapes?task=detect&n=8&size=32"
    for fmt in ("coco", "yolo", "voc", "labelstudio"):
        result = _ok(run("data", "convert", spec, str(tmp_path / fmt), "--to", fmt))
        assert "8 images" in result.stdout and any((tmp_path / fmt).iterdir())


def _autopilot_budget(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    # the README's budget; exit 3 (nothing fits) is an honest answer on a slow machine, a traceback is not
    result = _ok(run("autopilot", "--max-latency-ms", "0.2", "--max-size-mb", "1", "--max-drop", "1", "--epochs", "2",
                     "-q", cwd=tmp_path), 0, 3)
    if result.returncode == 0:
        summary = json.loads((tmp_path / "runs" / "autopilot" / "summary.json").read_text())
        assert "mean corruption error" in result.stdout
        assert summary["guardrails"]["mean_corruption_error"] is not None
    else:
        assert "no artifact meets the budget" in result.stderr


def _train(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--out", "runs/NAME", "--epochs", "1",
            "--image-size", "8", "-q", cwd=tmp_path))
    assert (tmp_path / "runs" / "NAME" / "model.safetensors").exists()


def _train_mlflow(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "8", "--epochs", "2",
            "--max-train-batches", "2", "--out", "runs/digits", "--mlflow", "file:./mlruns", "-q", cwd=tmp_path))
    [val_acc] = (tmp_path / "mlruns").rglob("metrics/val_acc")  # MLflow's file store: one line per logged value
    assert [line.split()[-1] for line in val_acc.read_text().splitlines()] == ["1", "2"]  # steps = epochs


def _train_resume(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--out", "runs/NAME", "--epochs", "2",
            "--image-size", "8", "--max-train-batches", "2", "-q", cwd=tmp_path))
    _ok(run("train", "--resume", "--out", "runs/NAME", "-q", cwd=tmp_path))


def _train_nproc(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("train", "--data", "builtin:digits", "--nproc", "2", "--out", "runs/ddp", "--model", "tinycnn_xs",
            "--image-size", "8", "--epochs", "1", "--max-train-batches", "2", "-q", cwd=tmp_path))
    assert json.loads((tmp_path / "runs" / "ddp" / "run.json").read_text())["processes"] == 2


def _train_config(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("train", "--config", str(plain / "config.yaml"), "--out", "runs/NAME2", "--epochs", "1", "-q",
            cwd=tmp_path))
    assert (tmp_path / "runs" / "NAME2" / "run.json").exists()


def _evaluate(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    result = _ok(run("evaluate", str(workspace / "runs" / "autopilot" / "bundle"), "--data", "builtin:digits",
                     "--split", "test"))
    assert "accuracy" in result.stdout


def _export(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("export", str(plain), "--format", "onnx"))
    # the guarded bundle autopilot shipped is not replaced silently
    guarded = Path(shutil.copytree(workspace / "runs" / "autopilot", tmp_path / "guarded"))
    before = (guarded / "bundle" / "manifest.json").read_bytes()
    refused = _ok(run("export", str(guarded), "--format", "onnx"), 2)
    assert "guardrails" in refused.stderr and "--force" in refused.stderr
    assert (guarded / "bundle" / "manifest.json").read_bytes() == before
    _ok(run("export", str(guarded), "--format", "onnx", "--force"))
    replaced = json.loads((guarded / "bundle" / "manifest.json").read_text())
    assert "guardrails" not in replaced and replaced.get("temperature", 1.0) == 1.0


def _predict(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    result = _ok(run("predict", str(plain / "bundle"), str(images)))
    assert len(result.stdout.splitlines()) == 3


def _bench(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("bench", str(plain), "--backend", "torch,onnxruntime,openvino", "--batch", "1,8", "--threads", "1",
            "--json", str(tmp_path / "bench.json")))
    assert (tmp_path / "bench.json").exists()


def _compress(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    result = _ok(run("compress", str(plain), "--prune", "0.25", "--distill", "--quantize", "int8,fp16",
                     "--max-drop", "1", "--finetune-epochs", "1"))
    assert "int8" in result.stdout and "fp16" in result.stdout


def _select(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("select", "--data", "builtin:digits", "--max-latency-ms", "100", "--max-size-mb", "10",
            "--candidates", "tinycnn_xs@8", "--epochs", "3", "--out", str(tmp_path / "sel")))
    assert (tmp_path / "sel" / "selection.json").exists()


def _tune(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    """The README's tune commands in miniature (digits, 2 trials of 1 epoch), then training its best.yaml."""
    result = _ok(run("tune", "--data", "builtin:digits", "--model", "tinycnn_xs", "--trials", "2", "--epochs", "1",
                     "--max-train-batches", "2", "--timeout", "30m", "--objectives", "accuracy,latency_ms,size_mb",
                     "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--out", "runs/tune", cwd=tmp_path))
    assert "best config: runs/tune/best.yaml" in result.stdout
    assert (tmp_path / "runs" / "tune" / "best" / "bundle" / "manifest.json").exists()
    _ok(run("train", "--config", "runs/tune/best.yaml", "--out", "runs/tuned", "-q", cwd=tmp_path))
    assert (tmp_path / "runs" / "tuned" / "model.safetensors").exists()


def _lr_find(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    result = _ok(run("lr-find", str(plain / "config.yaml"), "--data", "builtin:digits", "--model", "tinycnn_xs",
                     "--steps", "20", "--out", str(tmp_path / "lr")))
    assert "suggested peak learning rate" in result.stdout and (tmp_path / "lr" / "lr_find.png").exists()


def _train_teacher(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("train", "--teacher", str(plain / "bundle"), "--data", "builtin:digits", "--model", "tinycnn_xs",
            "--image-size", "8", "--epochs", "1", "--out", str(tmp_path / "student"), "-q"))


def _stress(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("stress", str(plain), "--data", "builtin:digits", "--suite", "quick", "--reference", str(plain / "bundle"),
            "--compare", str(plain / "bundle"), "--json", str(tmp_path / "s.json"), "--max-images", "40", "-q"))
    assert json.loads((tmp_path / "s.json").read_text())["mce"] is not None


def _attack(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("attack", str(plain), "--attacks", "fgsm,pgd-linf,pgd-l2,apgd-ce", "--epsilons", "0,1/255",
            "--restarts", "1", "--steps", "2", "--max-images", "24"))


def _calibrate(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("calibrate", str(plain)))


def _guard(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("guard", str(plain), "--detector", "mahalanobis", "--n-ood", "32"))


def _adapt(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    target = tmp_path / "darker"  # a new domain: the same digits, darker and noisier, as an image folder
    rng = np.random.default_rng(0)
    for i in range(200):
        pixels = digits.images[i] / 16 * 140 + rng.normal(0, 12, (8, 8))
        folder = target / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    _ok(run("adapt", str(plain), "--target", str(target), "--method", "bn", "--out", str(tmp_path / "adapted")))
    assert (tmp_path / "adapted" / "bundle" / "manifest.json").exists()


def _report(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    _ok(run("report", str(plain)))


def _list(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    assert "resnet18" in _ok(run("list", "models", "resnet*")).stdout
    for kind in ("sources", "tasks", "corruptions", "attacks", "ood-detectors", "ood-sets", "adaptation-methods",
                 "backends"):
        assert _ok(run("list", kind)).stdout.strip()


def _serve(workspace: Path, tmp_path: Path, plain: Path, images: Path) -> None:
    """`serve BUNDLE` with the README's options, then `predict --url` and the curl upload against it."""
    import httpx

    port = _free_port()
    env = {**os.environ, "LF_TEST_KEY": "s3cret"}
    server = subprocess.Popen([LENSFORGE, "serve", "runs/autopilot/bundle", "--port", str(port), "--workers", "1",
                               "--api-key-env", "LF_TEST_KEY", "--max-batch", "32", "--max-wait-ms", "5"],
                              cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()[1]
            time.sleep(0.2)
        else:
            pytest.fail("server did not become ready within 60 s")
        result = subprocess.run([LENSFORGE, "predict", "--url", url, "--api-key-env", "LF_TEST_KEY", str(images)],
                                capture_output=True, text=True, env=env, check=False, timeout=120)
        _ok(result)
        assert len(result.stdout.splitlines()) == 3
        with open(images / "0.png", "rb") as f:  # what `curl -F files=@digit.png .../v1/predict` sends
            answer = httpx.post(f"{url}/v1/predict", files={"files": ("digit.png", f, "image/png")},
                                headers={"X-API-Key": "s3cret"}, timeout=30)
        assert answer.status_code == 200, answer.text
    finally:
        server.terminate()
        server.communicate(timeout=30)


EXAMPLES = {
    "lensforge autopilot": _autopilot,
    "lensforge autopilot --data path/to/images --out runs/parts": _autopilot_folder,
    "lensforge autopilot --data path/to/images --time-budget 10m": _autopilot_time_budget,
    'lensforge autopilot --data "builtin:shapes?n=5000&size=32"': _autopilot_shapes,
    "lensforge autopilot --max-latency-ms 0.2 --max-size-mb 1 --max-drop 1": _autopilot_budget,
    "lensforge autopilot --data path/to/voc_folder --time-budget 10m": _autopilot_detection_folder,
    'lensforge autopilot --data "builtin:shapes?task=detect&n=4000&size=256"': _autopilot_detection_shapes,
    "lensforge data convert SRC --to coco\\|yolo\\|voc\\|labelstudio OUT": _data_convert,
    "lensforge autopilot --data path/to/images --time-budget 20m --tune 20": _autopilot_tune,
    "lensforge autopilot --data path/to/images --mlflow file:./mlruns": _autopilot_tune,
    "lensforge autopilot --tune N [--time-budget 10m] [--mlflow URI]": _autopilot_tune,
    "lensforge train --data SRC --mlflow URI": _train_mlflow,
    "lensforge train --data builtin:digits --out runs/digits --mlflow file:./mlruns": _train_mlflow,
    "lensforge train --data SRC --model NAME --out runs/NAME": _train,
    "lensforge train --resume --out runs/NAME": _train_resume,
    "lensforge train --data builtin:digits --nproc 2 --out runs/ddp": _train_nproc,
    "lensforge train --config runs/NAME/config.yaml --out runs/NAME2": _train_config,
    "lensforge evaluate RUN_OR_BUNDLE [--data SRC] [--split test]": _evaluate,
    "lensforge export RUN --format onnx": _export,
    "lensforge predict BUNDLE IMAGE_OR_DIR...": _predict,
    "lensforge bench RUN_OR_BUNDLE [--backend torch,onnxruntime,openvino] [--batch 1,8,32] [--threads N] "
    "[--json OUT]": _bench,
    "lensforge compress RUN [--prune R] [--distill] [--quantize int8,fp16] [--max-drop P]": _compress,
    "lensforge select --data SRC --max-latency-ms X [--max-size-mb Y] [--candidates m@size,...]": _select,
    "lensforge tune --data SRC --trials N [--timeout 30m] [--objectives accuracy,latency_ms,size_mb] "
    "[--storage URL] [--out TUNE]": _tune,
    'lensforge tune --data "builtin:shapes?n=2000&size=32" --trials 20 --timeout 30m --out runs/tune': _tune,
    "lensforge train --config runs/tune/best.yaml --out runs/tuned": _tune,
    "lensforge lr-find [CONFIG] [--data SRC] [--model NAME] [--steps 100]": _lr_find,
    "lensforge train --teacher RUN_OR_BUNDLE ...": _train_teacher,
    "lensforge stress RUN_OR_BUNDLE [--data SRC] [--suite quick\\|full] [--reference RUN] [--compare BUNDLE] "
    "[--json OUT]": _stress,
    "lensforge attack RUN_OR_BUNDLE [--attacks fgsm,pgd-linf,pgd-l2,apgd-ce] [--epsilons 0,1/255,...] "
    "[--restarts N]": _attack,
    "lensforge calibrate RUN_OR_BUNDLE": _calibrate,
    "lensforge guard RUN_OR_BUNDLE [--detector auto\\|msp\\|energy\\|mahalanobis\\|vim\\|knn]": _guard,
    "lensforge adapt RUN --target SRC --method bn\\|tent\\|pseudo-label\\|finetune [--labels N]": _adapt,
    "lensforge serve BUNDLE [--port 8000] [--workers N] [--api-key-env VAR] [--max-batch 32] [--max-wait-ms 5]": _serve,
    "lensforge predict --url http://127.0.0.1:8000 IMAGE_OR_DIR...": _serve,
    "lensforge serve runs/autopilot/bundle": _serve,
    "lensforge report RUN": _report,
    "lensforge list models 'resnet*'": _list,
}


def test_every_readme_example_has_a_test():
    missing = [example for example in readme_examples() if example not in EXAMPLES]
    assert not missing, f"README examples without a test in {Path(__file__).name}: {missing}"


def test_the_extractor_finds_blocks_and_table_cells():
    text = "```bash\nlensforge a --x 1   # note\n```\n| `lensforge b` / `list` | what |\n| plain | `lensforge c` |\n"
    assert readme_examples(text) == ["lensforge a --x 1", "lensforge b"]


@pytest.mark.parametrize("check", list(dict.fromkeys(EXAMPLES.values())), ids=lambda f: f.__name__.strip("_"))
def test_readme_example_runs(check, workspace, tmp_path, plain, images):
    check(workspace, tmp_path, plain, images)

"""CLI smoke tests through the installed console entry point (a real subprocess)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import LENSFORGE, run, tree_digest, wait_for, write_image_folder

from lensforge.deploy import load_bundle


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("autopilot", "train", "evaluate", "export", "predict", "report", "list"):
        assert command in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/dir", "--out", "{tmp}/r"], "does not exist"),
    (["train", "--data", "builtin:digits", "--model", "resnet181", "--out", "{tmp}/r"], "did you mean"),
    (["train", "--data", "builtin:digits", "--epochs", "0", "--out", "{tmp}/r"], "epochs"),
    (["train", "--data", "builtin:digitz", "--out", "{tmp}/r"], "unknown source"),
    (["evaluate", "{tmp}/nothing"], "no such file or folder"),
    (["predict", "{tmp}", "x.png"], "not a"),
    (["train", "--data", "builtin:digits", "--pretrained", "{tmp}/w.pth", "--model", "resnet10t", "--out", "{tmp}/r"],
     "no such file"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "r").exists()  # nothing written that could look like a run


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_corrupt_image_reported_by_path(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    before = tree_digest(root)
    result = run("train", "--data", str(root), "--out", str(tmp_path / "r"), "--epochs", "1", "-q")
    assert result.returncode == 2 and "broken.jpg" in result.stderr and "--on-bad-image skip" in result.stderr
    ok = run("train", "--data", str(root), "--out", str(tmp_path / "r2"), "--epochs", "1", "-q",
             "--on-bad-image", "skip", "--model", "tinycnn_xs")
    assert ok.returncode == 0, ok.stderr
    assert "broken.jpg" in (tmp_path / "r2" / "bad_images.json").read_text()
    assert tree_digest(root) == before  # source data untouched


def test_list_models_and_sources():
    models = run("list", "models", "tinycnn*")
    assert models.returncode == 0 and "tinycnn_s" in models.stdout
    sources = run("list", "sources")
    assert "builtin:digits" in sources.stdout and "builtin:shapes" in sources.stdout


def test_train_then_export_through_the_console_script(tmp_path):
    """The other CLI tests share a run trained through the API; this one trains and exports through the CLI."""
    out = tmp_path / "run"
    trained = run("train", "--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "8", "--epochs", "1",
                  "--max-train-batches", "3", "--out", str(out), "-q")
    assert trained.returncode == 0, trained.stderr
    exported = run("export", str(out))
    assert exported.returncode == 0, exported.stderr
    bundle = load_bundle(out / "bundle")  # its files' hashes are checked on load
    assert bundle.class_names == [str(d) for d in range(10)] and bundle.manifest["model"] == "tinycnn_xs"


def test_train_killed_between_checkpoints_then_resumed(tmp_path):
    """kill -9 once epoch 1 is checkpointed and before epoch 2 is; --resume finishes; weights equal a straight run's."""
    from safetensors.torch import load_file

    common = ["--data", "builtin:digits", "--model", "tinycnn_xs", "--image-size", "16", "--epochs", "3",
              "--batch-size", "32", "-q"]
    straight = run("train", *common, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([LENSFORGE, "train", *common, "--out", str(tmp_path / "b")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "checkpoints" / "latest.json"

    def checkpointed_epoch() -> int:
        return json.loads(latest.read_text())["epoch"] if latest.exists() else 0  # written atomically

    try:
        wait_for(lambda: checkpointed_epoch() >= 1 or proc.poll() is not None, timeout_s=240,
                 what="epoch 1's checkpoint")
    finally:
        proc.kill()
        proc.wait()
    assert checkpointed_epoch() == 1, "not killed in epoch 2: the run got past its second checkpoint"
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = run("train", "--resume", "--out", str(tmp_path / "b"), "-q")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "a" / "checkpoints" / "epoch-0003" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "epoch-0003" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

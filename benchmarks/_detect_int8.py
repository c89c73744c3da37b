"""fp32 against INT8 ONNX Runtime for a detection run's bundle: latency (interleaved, batch 1) and test mAP.

Two INT8 variants, both static QDQ (ONNX Runtime ``quantize_static``, minmax calibration on
256 training images, per-channel weights): the whole network, and the same with the
detection head (``net.model.head``: its towers and predictors) kept in fp32, as detection
deployments often do because box regression is where quantization error shows. Each is
scored on the run's test split through lensforge's detection evaluation (NumPy decoding,
COCO mAP in original pixels), and timed with ``lensforge.compress.measure.interleaved_latency``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def int8_report(run_dir: Path, calibration: int = 256) -> dict[str, Any]:
    from lensforge.artifacts import resolve_artifact
    from lensforge.compress.measure import interleaved_latency
    from lensforge.compress.quantize import module_nodes, prepare_for_quantization, quantize_int8
    from lensforge.data.sources import open_source
    from lensforge.data.splits import load_splits
    from lensforge.data.table import load_table
    from lensforge.deploy.bundle import load_bundle
    from lensforge.evaluate.detection_runner import evaluate_detector

    run_dir = Path(run_dir)
    fp32 = load_bundle(run_dir / "bundle")
    info = resolve_artifact(run_dir).run_info()
    table = load_table(open_source(info["data"]), fp32.preprocess)
    train = load_splits(run_dir / "splits.json", table).train
    pick = np.sort(np.random.default_rng(0).permutation(train)[:calibration])
    images = table.images[pick]
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        import onnx

        prepared = prepare_for_quantization(fp32, Path(work) / "prepared.onnx")
        # ORT's pre-processing drops the exporter's metadata and fuses some nodes: the head's
        # node names are read on the bundle's own graph and kept where they survived
        survived = {node.name for node in onnx.load(str(prepared)).graph.node}
        head = [name for name in module_nodes(fp32.path / "model.onnx", "net.model.head") if name in survived]
    variants = {"int8": run_dir / "variants" / "int8-all" / "bundle",
                "int8, fp32 head": run_dir / "variants" / "int8-fp32-head" / "bundle"}
    quantize_int8(fp32, variants["int8"], images)
    quantize_int8(fp32, variants["int8, fp32 head"], images, exclude_nodes=head)
    bundles = {"fp32": fp32.path, **variants}
    scores = {name: evaluate_detector(resolve_artifact(path, run_dir=run_dir), split="test", write=False).metrics
              for name, path in bundles.items()}
    latency = interleaved_latency(list(bundles.values()), batch=1)
    rows = {}
    for (name, path), timing in zip(bundles.items(), latency):
        p50 = timing["p50"]
        rows[name] = {"bundle": str(path), "map": scores[name]["map"], "map50": scores[name]["map50"],
                      "latency_ms_p50": p50, "size_mb": round((path / "model.onnx").stat().st_size / 1e6, 2)}
    base = rows["fp32"]
    for name, row in rows.items():
        row["speedup"] = round(base["latency_ms_p50"] / row["latency_ms_p50"], 3)
        row["map_drop_points"] = round(100 * (base["map"] - row["map"]), 2)
        print(f"{name:>16}: p50 {row['latency_ms_p50']:.2f} ms ({row['speedup']:.2f}x), mAP {row['map']:.3f} "
              f"({row['map_drop_points']:+.2f} points lost), mAP50 {row['map50']:.3f}, {row['size_mb']} MB")
    return {"run": str(run_dir), "head_nodes_kept_fp32": len(head), "calibration_images": len(images),
            "variants": rows}

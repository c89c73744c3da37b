"""The HTML run report: sections, embedding, escaping, missing files, the section registry."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lensforge.errors import ArtifactError
from lensforge.report import (
    SECTIONS,
    RunFiles,
    Section,
    Stat,
    Stats,
    list_sections,
    register_section,
    write_report,
)

BUILTIN_TITLES = {
    "summary": "Summary",
    "learning-curves": "Learning curves",
    "gradient-health": "Gradient health",
    "evaluation": "Evaluation",
    "bundle": "Bundle",
    "configuration": "Configuration",
}
PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', html)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sections registered by a test vanish after it."""
    monkeypatch.setattr(SECTIONS, "_entries", dict(SECTIONS._entries))


def test_full_run_has_every_section_in_order(full_report: tuple[Path, str]) -> None:
    run_dir, html = full_report
    assert (run_dir / "report.html").read_text(encoding="utf-8") == html
    assert section_ids(html) == list(BUILTIN_TITLES)
    for name, title in BUILTIN_TITLES.items():
        assert f'<section id="{name}">\n  <h2>{title}</h2>' in html
    assert "tiny-cnn-digits" in html and "resnet8" in html and "2024-05-01 14:03 UTC" in html
    assert "Test split — 150 images, evaluated on the exported bundle" in html
    assert "Val split" in html
    assert not list(run_dir.glob(".report.html.*"))  # atomic write left no temp file


def test_summary_shows_key_numbers_and_diagnosis(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    summary = html.split('<section id="summary">')[1].split("</section>")[0]
    for number in ("80.0%", "79.0%", "4.3%", "78.4 k", "1 min 23 s", "bundle/", "315.6 kB"):
        assert number in summary
    assert "Validation loss rises after epoch 4" in summary
    assert "Add augmentation (--augment strong)." in summary
    assert "One exploding-gradient event at step 45 was clipped." in summary


def test_images_are_embedded_pngs(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    images = PNG_URI.findall(html)
    # curves + gradients + (confusion + reliability) x 2 splits + 4 mistake thumbnails
    assert len(images) == 1 + 1 + 2 * 2 + 4
    assert html.count("data:image/png;base64,") == len(images)
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")


def test_mistake_thumbnails_are_enlarged_and_captioned(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    gallery = html.split('class="gallery"')[1].split("</figure>")[0]
    captions = re.findall(r'<div class="thumb-caption">([^<]+)</div>', gallery)
    # most confident first: confidences 0.9, 0.8, 0.7, 0.6
    assert captions == ["cat → dog (90%)", "&lt;script&gt; → cat (80%)",
                        "dog → &lt;script&gt; (70%)", "cat → dog (60%)"]
    first = base64.b64decode(PNG_URI.findall(gallery)[0])
    assert Image.open(io.BytesIO(first)).size == (96, 96)  # 8x8 x 12, nearest-neighbour


def test_report_is_self_contained(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert re.findall(r'href="([^"]*)"', html) == [f"#{name}" for name in BUILTIN_TITLES]


def test_text_from_run_files_is_escaped(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    assert "<script>" not in html
    assert "<td>&lt;script&gt;</td>" in html  # per-class table
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html  # config.yaml
    assert "<b>not bold</b>" not in html


def test_missing_and_bad_values_show_a_dash(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    epochs = html.split("Metrics per epoch")[1].split("</table>")[0]
    assert "<td class=\"num\">—</td>" in epochs  # val_acc None at epoch 3
    assert not re.search(r">\s*(nan|None|inf)\s*<", html)


def test_worst_classes_are_highlighted(full_report: tuple[Path, str]) -> None:
    html = full_report[1]
    assert re.search(r'<tr class="highlight">\s*<td>cat</td>', html)
    assert not re.search(r'<tr class="highlight">\s*<td>dog</td>', html)


def test_only_run_json_and_metrics_gives_the_sections_it_can(full_run: Path,
                                                               tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("run.json", "metrics.jsonl"):
        (partial / name).write_bytes((full_run / name).read_bytes())
    html = write_report(partial, strict=True).read_text(encoding="utf-8")
    assert section_ids(html) == ["summary", "learning-curves", "configuration"]
    summary = html.split('<section id="summary">')[1].split("</section>")[0]
    assert summary.count(">—<") == 4  # accuracy, macro-F1, ECE, bundle: unknown
    assert "not exported" in summary
    assert len(PNG_URI.findall(html)) == 1


def test_empty_run_folder_still_gives_a_report(tmp_path: Path) -> None:
    html = write_report(tmp_path, strict=True).read_text(encoding="utf-8")
    assert section_ids(html) == []
    assert "none of the files" in html
    assert f"<h1>{tmp_path.name}</h1>" in html


def test_missing_run_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_malformed_file_becomes_a_notice_unless_strict(full_run: Path) -> None:
    (full_run / "bundle" / "manifest.json").write_text("{not json", encoding="utf-8")
    html = write_report(full_run).read_text(encoding="utf-8")
    bundle = html.split('<section id="bundle">')[1].split("</section>")[0]
    assert "This section could not be built" in bundle and "manifest.json" in bundle
    assert section_ids(html)[-1] == "configuration"  # the rest of the report is there
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        write_report(full_run, strict=True)


def test_mistake_image_outside_run_folder_is_not_embedded(full_run: Path, tmp_path: Path
                                                          ) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes((full_run / "eval/mistakes/test_000.png").read_bytes())
    scores = json.loads((full_run / "eval/test.json").read_text())
    scores["mistakes"] = [dict(scores["mistakes"][0], image="../secret.png")]
    (full_run / "eval/test.json").write_text(json.dumps(scores))
    html = write_report(full_run, strict=True).read_text(encoding="utf-8")
    assert "image missing" in html
    assert len(PNG_URI.findall(html)) == 1 + 1 + 2 * 2


def test_third_party_section_appears_in_order(full_run: Path, scratch_registry: None) -> None:
    @register_section("plugin-fog", order=47)
    def plugin_fog(run: RunFiles) -> Section | None:
        scores = run.json("plugin/fog.json")
        if scores is None:
            return None
        return Section("Fog <fp32 vs int8>", [Stats([Stat("fog", f"{scores['fog']:.0%}")])])

    html = write_report(full_run, strict=True).read_text(encoding="utf-8")
    assert "plugin-fog" not in section_ids(html)  # its input is missing: skipped

    (full_run / "plugin").mkdir()
    (full_run / "plugin/fog.json").write_text('{"fog": 0.61}')
    html = write_report(full_run, strict=True).read_text(encoding="utf-8")
    assert section_ids(html) == ["summary", "learning-curves", "gradient-health", "evaluation",
                                 "plugin-fog", "bundle", "configuration"]
    assert "<h2>Fog &lt;fp32 vs int8&gt;</h2>" in html and "61%" in html


def test_duplicate_section_name_raises(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_section("evaluation", order=99)(lambda run: None)
    assert [spec.order for spec in list_sections() if spec.name == "evaluation"] == [40]


def test_section_returning_raw_html_is_refused(full_run: Path, scratch_registry: None) -> None:
    @register_section("raw", order=1)
    def raw(run: RunFiles) -> Section:
        return Section("Raw", ["<b>html</b>"])  # type: ignore[list-item]

    with pytest.raises(TypeError, match="'raw' returned a str"):
        write_report(full_run, strict=True)


def test_report_does_not_import_torch(full_run: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "from lensforge.report import write_report\n"
            f"write_report({str(full_run)!r}, strict=True)\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_failing_plugin_section_does_not_cost_the_report(full_run: Path,
                                                         scratch_registry: None) -> None:
    @register_section("broken", order=15)
    def broken(run: RunFiles) -> Section:
        raise AttributeError("'str' object has no attribute 'get'")

    html = write_report(full_run).read_text(encoding="utf-8")
    assert section_ids(html) == ["summary", "broken", *list(BUILTIN_TITLES)[1:]]
    assert "AttributeError: &#39;str&#39; object has no attribute &#39;get&#39;" in html


def test_events_without_history_still_get_a_table(tmp_path: Path) -> None:
    (tmp_path / "health.json").write_text(json.dumps({"events": [
        {"step": 3, "epoch": 1, "kind": "nan_loss", "layer": None, "value": float("nan"),
         "action": "stopped", "message": "loss became NaN"}]}))
    html = write_report(tmp_path, strict=True).read_text(encoding="utf-8")
    assert section_ids(html) == ["summary", "gradient-health"]
    assert "loss became NaN" in html and not PNG_URI.findall(html)


@pytest.mark.parametrize(("parity", "shown"), [
    ({"max_abs_diff_logits": 2e-6, "atol": 1e-4, "top1_agreement": 1.0},
     ("tone-ok", "2e-06 ✓", "atol 1e-04", "top-1 agreement 100.0%")),
    ({"max_abs_diff": 0.5, "atol": 1e-3}, ("tone-bad", "0.5 ✗")),
    ({}, ("not checked",)),
])
def test_bundle_parity(tmp_path: Path, parity: dict, shown: tuple[str, ...]) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle/manifest.json").write_text(json.dumps({"parity": parity, "files": {
        "model.onnx": {"sha256": "0123456789abcdef" * 4, "bytes": 2_500_000}}}))
    html = write_report(tmp_path, strict=True).read_text(encoding="utf-8")
    bundle = html.split('<section id="bundle">')[1].split("</section>")[0]
    for text in shown:
        assert text in bundle
    assert "0123456789abcdef…" in bundle and "2.5 MB" in bundle


def test_fit_diagnosis_tones(tmp_path: Path) -> None:
    (tmp_path / "diagnosis.json").write_text(json.dumps({"fit": [
        {"kind": "healthy", "message": "fine", "suggestions": []},
        {"kind": "underfitting", "message": "train acc 41%", "suggestions": ["Train longer."]},
        "not a dict"]}))
    html = write_report(tmp_path, strict=True).read_text(encoding="utf-8")
    assert re.search(r'callout tone-ok">\s*<div class="callout-title">Healthy', html)
    assert re.search(r'callout tone-warn">\s*<div class="callout-title">Underfitting', html)
    assert "<li>Train longer.</li>" in html

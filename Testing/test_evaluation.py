"""The evaluation harness (benchmarks/evaluate.py) on the bundled sample data only (no ../shared, no peers)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.evaluate import select_methods
from benchmarks.evaluation import harness, registry
from benchmarks.evaluation.method import NOT_AVAILABLE, NOT_INSTALLED, Method, RunContext
from benchmarks.evaluation.metrics import evaluate, hd95_mm
from benchmarks.evaluation.pairs import CT_THRESHOLD, PairSpec, load_pair_list, prepare_pair
from benchmarks.evaluation.report import README_END, README_START, update_readme, write_report
from SAMERegistrationLib.export import read_initial_transform
from SAMERegistrationLib.image import Image
from SAMERegistrationLib.metrics import dice_per_label, shared_labels
from SAMERegistrationLib.modes import MODE_NAMES
from SAMERegistrationLib.spatial.transform import SpatialTransform
from SAMERegistrationLib.spatial.warp import resample_labels

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "Resources" / "SampleData"
SPACING_MM = 8.0
SAMPLE_PAIR = PairSpec("A->C", SAMPLES / "patientC_abdomen_ct.nii.gz", SAMPLES / "patientA_abdomen_ct.nii.gz",
                       SAMPLES / "patientC_abdomen_labels.nii.gz", SAMPLES / "patientA_abdomen_labels.nii.gz",
                       SAMPLES / "label_names.json", group="inter-patient")


def failing_method(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    """A plug-in method that raises (run by the harness's worker as Testing.test_evaluation:failing_method)."""
    raise RuntimeError("this method always fails")


def crashing_method(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    """A plug-in method whose process dies as in a segmentation fault."""
    os.kill(os.getpid(), signal.SIGSEGV)


def nan_method(fixed: Image, moving: Image, context: RunContext) -> SpatialTransform:
    """A plug-in method whose field is NaN in one voxel (must fail, not be scored)."""
    field = torch.zeros((3, *fixed.grid.shape))
    field[1, 0, 0, 0] = float("nan")
    return SpatialTransform(np.eye(4), field, fixed.grid)


def _results_as_text(rows: list[harness.Row]) -> str:
    """Status, metrics and per-label scores of ``rows`` as JSON (compares NaN entries as equal)."""
    return json.dumps([(row.status, row.metrics, row.per_label) for row in rows], default=lambda value: value.item())


def test_hd95_of_a_shifted_box_is_the_shift_in_mm():
    box = torch.zeros((20, 24, 24), dtype=torch.bool)
    box[4:14, 6:16, 6:16] = True
    spacing_dhw = (2.5, 1.0, 0.8)
    assert hd95_mm(box, box, spacing_dhw) == 0.0
    assert hd95_mm(box, torch.roll(box, 2, dims=0), spacing_dhw) == pytest.approx(5.0, abs=1e-4)
    assert hd95_mm(box, torch.roll(box, 3, dims=2), spacing_dhw) == pytest.approx(2.4, abs=1e-4)
    assert math.isnan(hd95_mm(box, torch.zeros_like(box), spacing_dhw))


def test_tre_of_the_identity_on_a_known_translation_is_its_length_and_threshold_labels():
    torso = SAMPLES / "patientA_torso_ct.nii.gz"
    spec = PairSpec("shift", torso, fixed_labels=CT_THRESHOLD, synthetic={
        "rotation_deg": [0, 0, 0], "scale": [1, 1, 1], "translation_mm": [12.0, -9.0, 0.0], "field_amplitude_mm": 0.0})
    pair = prepare_pair(spec, SPACING_MM)
    result = evaluate(pair, torch.zeros((3, *pair.fixed.grid.shape)))
    assert result.summary["tre_points"] > 1000
    assert result.summary["tre_median_mm"] == pytest.approx(15.0, abs=1e-3)
    assert result.summary["tre_p90_mm"] == pytest.approx(15.0, abs=1e-3)
    assert result.summary["percent_nonpositive_jacobian"] == 0.0
    assert result.summary["std_log_jacobian"] == pytest.approx(0.0, abs=1e-6)
    assert result.summary["labels"] == 3 and 0.0 < result.summary["mean_dice"] < 1.0

    labels, hu = pair.fixed_labels.data, pair.fixed.data
    assert set(torch.unique(labels).tolist()) == {0, 1, 2, 3}
    assert bool((hu[labels == 1] < -400).all()) and bool((hu[labels == 2] > 300).all())
    assert (labels == 1).sum() * SPACING_MM**3 / 1000 > 200   # mL: the lung bases of the torso CT


def test_landmark_tre(tmp_path):
    points = np.array([[10.0, -50.0, -790.0], [-40.0, 20.0, -780.0], [0.0, 0.0, -800.0]])
    (tmp_path / "fixed.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in points))
    (tmp_path / "moving.csv").write_text("\n".join(",".join(map(str, p + [3.0, 4.0, 0.0])) for p in points))
    spec = PairSpec("landmarks", SAMPLE_PAIR.fixed, SAMPLE_PAIR.moving, fixed_landmarks=tmp_path / "fixed.csv",
                    moving_landmarks=tmp_path / "moving.csv")
    pair = prepare_pair(spec, SPACING_MM)
    result = evaluate(pair, torch.zeros((3, *pair.fixed.grid.shape)))
    assert result.summary["tre_median_mm"] == pytest.approx(5.0, abs=1e-4)
    assert math.isnan(result.summary["mean_dice"])


def test_methods_include_every_mode_and_peer():
    names = [method.name for method in select_methods("all")]
    assert names[0] == "identity"
    assert all(mode in names for mode in MODE_NAMES)
    assert {"elastix", "ants", "niftyreg", "greedy", "convexadam"} <= set(names)
    assert [m.name for m in select_methods("peers,identity")][-1] == "identity"


def test_shipped_pair_lists_load():
    _, sample = load_pair_list(REPO / "benchmarks" / "pairs" / "sample.json")
    assert all(spec.fixed.exists() for spec in sample)
    _, shared = load_pair_list(REPO / "benchmarks" / "pairs" / "shared_ct.json")
    assert len([spec for spec in shared if spec.synthetic]) == 6 and len(shared) == 9
    _, chest = load_pair_list(REPO / "benchmarks" / "pairs" / "chest_known_deformation.json")
    same_pair = [spec for spec in shared if spec.name == chest[0].name]
    assert len(chest) == 1 and same_pair and same_pair[0].synthetic == chest[0].synthetic


def test_harness_end_to_end(tmp_path, monkeypatch):
    """SAM-affine on the down-sampled sample pair: the CSV's Dice equals an independent recomputation;
    a method that raises, one that crashes, a peer that is missing and a mode not yet available are
    rows saying so."""
    missing = Method("missing-tool", "a missing tool", "none", registry.run_identity, ("no_such_module_xyz",),
                     ("no-such-tool",))
    unavailable = Method("future-mode", "a future mode", "none", None, kind="ours")
    methods = [registry.resolve_method(name) for name in
               ("affine", "Testing.test_evaluation:failing_method", "Testing.test_evaluation:crashing_method",
                "Testing.test_evaluation:nan_method")]
    methods += [missing, unavailable]
    fields = tmp_path / "fields"
    rows = harness.run_benchmark([SAMPLE_PAIR], methods, threads=1, spacing=SPACING_MM, timeout_s=300,
                                 fields=fields, records=tmp_path / "rows", log=lambda line: None)
    write_report(rows, tmp_path / "out", "test", ["threads: 1"])

    lines: list[str] = []  # a resumed run reuses every recorded row and reports the same numbers
    resumed = harness.run_benchmark([SAMPLE_PAIR], methods, threads=1, spacing=SPACING_MM, timeout_s=300,
                                    records=tmp_path / "rows", resume=True, log=lines.append)
    assert sum(": reused, " in line for line in lines) == len(methods)
    assert _results_as_text(resumed) == _results_as_text(rows)
    unsaved = Method("unsaved", "a method without saved rows", "none", registry.run_identity, kind="baseline")
    saved_only = harness.run_benchmark([SAMPLE_PAIR], methods + [unsaved], threads=1, spacing=SPACING_MM,
                                       timeout_s=300, records=tmp_path / "rows", resume=True, run_missing=False,
                                       log=lambda line: None)
    assert saved_only[-1].status == harness.NOT_RUN and _results_as_text(saved_only[:-1]) == _results_as_text(rows)
    # SAM's affine across these two patients is rejected, and the row keeps the stage's warning
    assert any(warning.startswith("sam-affine: ") for warning in rows[0].warnings), rows[0].warnings

    with open(tmp_path / "out" / "results.csv") as stream:
        table = {row["method"]: row for row in csv.DictReader(stream)}
    assert table["affine"]["status"] == "ok" and table["affine"]["threads"] == "1"
    assert table["Testing.test_evaluation:failing_method"]["status"] == \
        "failed: RuntimeError: this method always fails"
    assert table["Testing.test_evaluation:crashing_method"]["status"] == "failed: killed by SIGSEGV"
    assert re.fullmatch(r"failed: RuntimeError: the result has \d+ of \d+ voxels with a non-finite displacement",
                        table["Testing.test_evaluation:nan_method"]["status"])
    assert table["missing-tool"]["status"].startswith(f"{NOT_INSTALLED}: no module no_such_module_xyz")
    assert table["future-mode"]["status"] == NOT_AVAILABLE
    assert float(table["affine"]["seconds"]) > 0 and float(table["affine"]["cpu_seconds"]) > 0
    assert float(table["affine"]["peak_mib"]) > 100

    pair = prepare_pair(SAMPLE_PAIR, SPACING_MM)
    transform = read_initial_transform(fields / "A-_C__affine.h5", pair.fixed.grid)
    warped = resample_labels(pair.moving_labels, pair.fixed.grid, transform).data
    labels = shared_labels(pair.fixed_labels.data, pair.moving_labels.data)
    dice = dice_per_label(pair.fixed_labels.data, warped, labels)
    assert float(table["affine"]["mean_dice"]) == pytest.approx(np.mean(list(dice.values())), abs=1e-6)
    assert float(table["affine"]["mean_dice"]) > 0.05
    with open(tmp_path / "out" / "per_label.csv") as stream:
        per_label = {int(row["label"]): float(row["dice"]) for row in csv.DictReader(stream)}
    assert per_label == pytest.approx(dice, abs=1e-6)

    markdown = (tmp_path / "out" / "results.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Tool\nbefore\n{README_START}\nold results\n{README_END}\nafter\n")
    update_readme(readme, [tmp_path / "out" / "results.md"])
    text = readme.read_text()
    assert text.startswith("# Tool\nbefore\n") and text.endswith(f"{README_END}\nafter\n") and "old results" not in text
    assert "#### Summary: inter-patient" in text and "| SAMERegistration --mode affine | 1 of 1 |" in text
    assert "[`out/results.md`](out/results.md)" in text and "## Every pair and method" not in text
    with pytest.raises(ValueError, match="add the lines"):
        update_readme(tmp_path / "out" / "results.md", [tmp_path / "out" / "results.md"])
    assert "| a missing tool | not installed: no module no_such_module_xyz" in markdown
    assert "## What the methods warned about" in markdown and "- A->C / affine: sam-affine: " in markdown
    assert (tmp_path / "out" / "dice_boxplot.png").exists() and (tmp_path / "out" / "time_vs_dice.png").exists()

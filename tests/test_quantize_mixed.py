"""`prismq quantize --target-bits` end to end on the real default model (small calibration, shared work dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prismq.cli import main

pytestmark = pytest.mark.slow
SMALL = ["--calib-blocks", "4", "--calib-seqlen", "128", "--heldout-blocks", "2", "--selection-blocks", "2",
         "--select-units", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, default_model_dir: Path) -> Path:
    return tmp_path_factory.mktemp("mixed") / "work"


def test_target_bits_stays_within_budget_and_reports(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    assert main(["quantize", "--formats", "NVFP4,MXFP8,BF16", "--target-bits", "4.75", "--work-dir", str(work),
                 "--out", str(out), "--rounding", "best", *SMALL]) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert 4.5 < summary["bits_per_param"] <= 4.75
    formats = set(summary["assignment"].values())
    assert {"NVFP4", "MXFP8"} <= formats
    frontier = json.loads((work / "frontier.json").read_text())
    assert len(frontier["points"]) >= 10 and (work / "frontier.png").stat().st_size > 10_000
    report = (work / "report.md").read_text()
    assert "bits/param" in report and "![frontier](frontier.png)" in report and "| layer |" in report
    rounding = summary["rounding"]
    assert rounding["methods"] == ["rtn", "gptq", "gptq+sweep"] and set(rounding["mean_kl"]) == set(rounding["methods"])
    assert rounding["mean_kl"][rounding["chosen"]] == min(rounding["mean_kl"].values())
    assert f"- uniform NVFP4 (4.500 bits/param, {rounding['chosen']}): selection-split mean KL" in report
    assert "## Selection (measured KL)" in report and summary["selection"]["flips_measured"] >= 4
    assert "NVFP4" in summary["uniform_baselines"] and "## Rounding" in report
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "mixed-precision" and qconfig["ignore"] == ["lm_head"]


def test_impossible_budget_says_the_minimum_and_writes_nothing(work: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "too-small"
    assert main(["quantize", "--formats", "NVFP4,MXFP8,BF16", "--target-bits", "3.0", "--work-dir", str(work),
                 "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "below" in err and "4.5" in err
    assert not out.exists()


def test_budget_above_all_bf16_writes_bf16(work: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "roomy"
    assert main(["quantize", "--formats", "NVFP4,MXFP8,BF16", "--target-bits", "17", "--work-dir", str(work),
                 "--out", str(out), *SMALL]) == 0
    assert "nothing to trade off" in capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["assignment"].values()) == {"BF16"} and summary["eval"]["mean_kl"] == 0.0


def test_target_size_bounds_the_whole_checkpoint(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "sized"
    assert main(["quantize", "--formats", "NVFP4,MXFP8,BF16", "--target-size", "0.125", "--work-dir", str(work),
                 "--out", str(out), "--rounding", "rtn", *SMALL]) == 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["checkpoint_bytes"] <= 0.125e9
    assert summary["checkpoint_bytes"] > 0.124e9  # the budget is used, not wasted
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert written >= summary["checkpoint_bytes"]  # files add only their small headers

"""quantize as a list of resumable stages on the real default model: `prismq allocate`, `prismq export` and
`prismq report` on their own, each reusing what the work directory holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prismq.cli import main

pytestmark = pytest.mark.slow
SMALL = ["--calib-blocks", "4", "--calib-seqlen", "128", "--heldout-blocks", "2", "--selection-blocks", "2",
         "--select-units", "4", "--device", "cpu", "--formats", "NVFP4,MXFP8,BF16", "--target-bits", "4.75",
         "--polish-units", "0"]  # what ships is a rounding lane (the polish's own exactness: test_polish.py)


def test_stages_run_alone_and_resume(default_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    assert main(["allocate", "--work-dir", str(work), *SMALL]) == 0
    allocation = json.loads((work / "allocation.json").read_text())
    assert 4.5 < _bits(allocation["allocation"]["assignment"], work) <= 4.75
    assert not out.exists() and not (work / "rounding.json").exists()

    assert main(["export", "--work-dir", str(work), "--out", str(out), "--rounding", "rtn", *SMALL]) == 0
    assert (work / "allocation.json").read_text() == json.dumps(allocation, indent=1, sort_keys=True) + "\n"
    rounding = json.loads((work / "rounding.json").read_text())["rounding"]
    evaluation = json.loads((work / "eval.json").read_text())
    # the checkpoint read back by compressed-tensors measures exactly what the rounding lane measured (report split)
    shipped = (rounding["mix_report"] if rounding["shipped"] == "mix"
               else rounding["baseline_reports"][rounding["shipped"]])
    assert evaluation["mean_kl"] == shipped["mean_kl"] > 0
    first = sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors"))

    import prismq.rounding.stage as stage

    monkeypatch.setattr(stage, "rounding_walk", lambda *a, **k: pytest.fail("rounding redone instead of resumed"))
    assert main(["quantize", "--work-dir", str(work), "--out", str(out), "--overwrite", "--rounding", "rtn",
                 *SMALL]) == 0
    assert sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors")) == first

    (work / "report.md").unlink()
    assert main(["report", "--work-dir", str(work)]) == 0
    assert "bits/param" in (work / "report.md").read_text()
    capsys.readouterr()


def _bits(assignment: dict[str, str], work: Path) -> float:
    """Bits per parameter of an assignment from the cost rows."""
    rows = {(r["linear"], r["format"]): r for r in json.loads((work / "cost.json").read_text())["rows"]}
    size = sum(rows[(n, f)]["bytes"] for n, f in assignment.items())
    return 8 * size / sum(rows[(n, f)]["params"] for n, f in assignment.items())

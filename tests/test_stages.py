"""`prismq probe` then `prismq cost` on the real default model: resumable, disjoint held-out text kept aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prismq.cli import main

pytestmark = pytest.mark.slow
WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-test.txt"


@pytest.fixture(scope="module")
def work(tmp_path_factory, default_model_dir: Path) -> Path:
    work = tmp_path_factory.mktemp("work")
    args = ["probe", "--work-dir", str(work), "--calib-blocks", "2", "--heldout-blocks", "2", "--seqlen", "64",
            "--sample-rows", "16", "--device", "cpu"]
    if WIKITEXT.exists():
        args += ["--calib", str(WIKITEXT)]
    assert main(args) == 0
    return work


def test_probe_then_cost_write_resumable_artifacts(work: Path, capsys, monkeypatch) -> None:
    probe_meta = json.loads((work / "probe.json").read_text())
    assert probe_meta["tokens"] == 2 * 64 and probe_meta["linears"] == 210 and 1.0 < probe_meta["loss"] < 8.0
    assert main(["cost", "--work-dir", str(work), "--formats", "NVFP4,MXFP8,INT4_W4A16,BF16", "--device", "cpu"]) == 0
    cost = json.loads((work / "cost.json").read_text())
    by_format: dict[str, float] = {}
    for row in cost["rows"]:
        by_format[row["format"]] = by_format.get(row["format"], 0.0) + row["predicted_dloss"]
    assert by_format["BF16"] == 0.0
    assert by_format["NVFP4"] > by_format["MXFP8"] > 0.0  # 4-bit costs more than 8-bit
    assert "NVFP4" in capsys.readouterr().out

    import prismq.measure.fisher_streamed as fisher_streamed

    monkeypatch.setattr(fisher_streamed, "probe_streamed",
                        lambda *a, **k: pytest.fail("probe recomputed instead of resuming"))
    args = ["probe", "--work-dir", str(work), "--calib-blocks", "2", "--heldout-blocks", "2", "--seqlen", "64",
            "--sample-rows", "16", "--device", "cpu"] + (["--calib", str(WIKITEXT)] if WIKITEXT.exists() else [])
    assert main(args) == 0
    assert main(args + ["--seed", "1"]) == 1
    assert "other settings (seed)" in capsys.readouterr().err


def test_cost_without_a_probe_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["cost", "--work-dir", str(tmp_path)]) == 1
    assert "run `prismq probe MODEL" in capsys.readouterr().err

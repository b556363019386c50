"""The command line: help, unbuilt stages (eval is tested in test_kl.py), config file + flag precedence, validation
errors as one-line messages."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from prismq import __version__
from prismq.cli import main
from prismq.config import QuantizeConfig, parse_size
from prismq.errors import PrismqError

SUBCOMMANDS = ["quantize", "probe", "cost", "allocate", "select", "export", "eval", "report", "formats"]


class Recorded(list):
    """The configs the stub pipeline was given, and up to which stage each run went (`until`)."""

    def __init__(self) -> None:
        super().__init__()
        self.until: list[str] = []


@pytest.fixture
def fake_pipeline(monkeypatch) -> Recorded:
    """Replace prismq.pipeline with a stub that records the config it is given."""
    seen = Recorded()
    module = types.ModuleType("prismq.pipeline")
    module.quantize = lambda config, until="export": seen.append(config) or seen.until.append(until)
    monkeypatch.setitem(sys.modules, "prismq.pipeline", module)
    return seen


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in out, name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: prismq {name}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"prismq {__version__}"


def test_allocate_select_and_export_run_the_stage_list_up_to_themselves(fake_pipeline):
    assert main(["allocate", "--target-bits", "5", "--work-dir", "w"]) == 0
    assert main(["select", "--target-bits", "5", "--work-dir", "w", "--select-units", "3"]) == 0
    assert main(["export", "--uniform", "NVFP4", "--out", "x"]) == 0
    assert fake_pipeline.until == ["allocate", "select", "export"] and fake_pipeline[2].uniform == "NVFP4"
    assert fake_pipeline[1].select_units == 3


def test_report_without_a_summary_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--work-dir", str(tmp_path)]) == 1
    assert "has no summary.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag, key", [("--target-bits", "target_bits"), ("--target-size", "target_size")])
def test_budgets_reach_the_pipeline(flag, key, fake_pipeline):
    assert main(["quantize", flag, "4.5", "--out", "x"]) == 0
    assert getattr(fake_pipeline[0], key) == 4.5 and fake_pipeline[0].uniform is None


@pytest.mark.parametrize("rounding", ["rtn", "gptq", "gptq+sweep", "best"])
def test_rounding_reaches_the_pipeline(rounding, fake_pipeline):
    assert main(["quantize", "--uniform", "NVFP4", "--rounding", rounding, "--out", "x"]) == 0
    assert fake_pipeline[0].rounding == rounding


def test_unknown_rounding_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--uniform", "NVFP4", "--rounding", "awq", "--out", "x"])
    assert exc.value.code == 2 and "invalid choice: 'awq'" in capsys.readouterr().err


def test_uniform_runs_pipeline_with_defaults(fake_pipeline):
    assert main(["quantize", "--uniform", "nvfp4", "--out", "out/x"]) == 0
    (config,) = fake_pipeline
    assert config.uniform == "NVFP4"
    assert config.model is None
    assert config.out == Path("out/x")
    assert config.formats == ["NVFP4", "MXFP8", "BF16"]
    assert (config.rounding, config.device, config.overwrite) == ("gptq+sweep", "auto", False)
    assert (config.gptq_act_order, config.gptq_damping, config.gptq_block_size) == (True, [0.01], 128)
    assert config.compute_dtype == "auto"
    assert config.max_shard_bytes == 5 * 10**9
    assert (config.calib_blocks, config.calib_seqlen, config.heldout_blocks) == (32, 512, 16)


def test_all_flags_reach_the_config(fake_pipeline):
    argv = ["quantize", "model-dir", "--uniform", "MXFP8", "--formats", "nvfp4,bf16", "--calib", "c.txt",
            "--heldout", "h.txt", "--force", "lm_head=bf16", "mlp\\.down=nvfp4", "--work-dir", "w", "--out", "o",
            "--overwrite", "--device", "cpu", "--max-shard-size", "500MB", "--calib-blocks", "4",
            "--calib-seqlen", "128"]
    assert main(argv) == 0
    (config,) = fake_pipeline
    assert config.model == "model-dir"
    assert config.formats == ["NVFP4", "BF16"]
    assert config.force == ["lm_head=BF16", "mlp\\.down=NVFP4"]
    assert [(p.pattern, f) for p, f in config.force_rules()] == [("lm_head", "BF16"), ("mlp\\.down", "NVFP4")]
    assert (config.calib, config.heldout, config.work_dir, config.out) == ("c.txt", "h.txt", Path("w"), Path("o"))
    assert config.overwrite and config.device == "cpu"
    assert config.max_shard_bytes == 500 * 10**6
    assert (config.calib_blocks, config.calib_seqlen) == (4, 128)


def test_config_file_then_flags_override(tmp_path, fake_pipeline):
    path = tmp_path / "run.toml"
    path.write_text('uniform = "mxfp8"\nout = "from-file"\ndevice = "cpu"\ncalib-blocks = 3\n'
                    'formats = ["NVFP4", "MXFP8"]\n')
    assert main(["quantize", "--config", str(path), "--out", "from-cli", "--calib-seqlen", "64"]) == 0
    (config,) = fake_pipeline
    assert config.out == Path("from-cli")  # flag wins
    assert config.device == "cpu" and config.calib_blocks == 3 and config.uniform == "MXFP8"  # file kept
    assert config.calib_seqlen == 64
    assert config.formats == ["NVFP4", "MXFP8"]


def test_cli_budget_replaces_file_budget(tmp_path, fake_pipeline):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"target_bits": 4.75, "out": "o"}))
    assert main(["quantize", "--config", str(path), "--uniform", "BF16"]) == 0
    (config,) = fake_pipeline
    assert config.uniform == "BF16" and config.target_bits is None


def test_config_load_and_with_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"uniform": "nvfp4", "out": "o", "max_shard_size": "2gib"}))
    config = QuantizeConfig.load(path)
    assert config.uniform == "NVFP4" and config.max_shard_size == "2GIB" and config.max_shard_bytes == 2 * 2**30
    changed = config.with_overrides({"target_bits": 4.5})
    assert changed.target_bits == 4.5 and changed.uniform is None and config.uniform == "NVFP4"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "--uniform", "NVFP4"], "out is required"),
        (["quantize", "--out", "o"], "exactly one of --target-bits, --target-size, --uniform"),
        (["quantize", "--uniform", "NVFP4", "--out", "o", "--force", "lm_head"], "must look like REGEX=FORMAT"),
        (["quantize", "--uniform", "NVFP4", "--out", "o", "--force", "(=BF16"], "bad regex"),
        (["quantize", "--uniform", "NVFP4", "--out", "o", "--max-shard-size", "lots"], "cannot parse size"),
        (["quantize", "--uniform", "NVFP4", "--out", "o", "--calib-blocks", "0"], "calib_blocks"),
        (["quantize", "--config", "missing.toml", "--uniform", "NVFP4", "--out", "o"], "cannot read config file"),
    ],
)
def test_validation_errors_are_one_line(argv, message, capsys, fake_pipeline):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("prismq: error: ") and message in err
    assert err.count("\n") == 1
    assert fake_pipeline == []


def test_config_file_errors(tmp_path, capsys, fake_pipeline):
    bad_key = tmp_path / "a.json"
    bad_key.write_text(json.dumps({"uniform": "NVFP4", "out": "o", "bogus": 1}))
    assert main(["quantize", "--config", str(bad_key)]) == 1
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    bad_toml = tmp_path / "b.toml"
    bad_toml.write_text("uniform = \n")
    assert main(["quantize", "--config", str(bad_toml)]) == 1
    assert "is not valid TOML" in capsys.readouterr().err
    yaml = tmp_path / "c.yaml"
    yaml.write_text("uniform: NVFP4\n")
    assert main(["quantize", "--config", str(yaml)]) == 1
    assert "must be .json or .toml" in capsys.readouterr().err


def test_bad_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--uniform", "NVFP4", "--target-bits", "4", "--out", "o"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_prismq_error_and_interrupt_exit_codes(monkeypatch, capsys):
    module = types.ModuleType("prismq.pipeline")

    def fail(config, until="export"):
        raise PrismqError("model path not found: nowhere")

    module.quantize = fail
    monkeypatch.setitem(sys.modules, "prismq.pipeline", module)
    assert main(["quantize", "--uniform", "NVFP4", "--out", "o"]) == 1
    assert capsys.readouterr().err == "prismq: error: model path not found: nowhere\n"

    def interrupt(config, until="export"):
        raise KeyboardInterrupt

    module.quantize = interrupt
    assert main(["quantize", "--uniform", "NVFP4", "--out", "o"]) == 130
    assert capsys.readouterr().err == "prismq: interrupted (nothing half-written; rerun to resume)\n"


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("0GB")

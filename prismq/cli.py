"""The `prismq` command line (DESIGN.md §1b): argument parsing, dispatch, and errors mapped to exit codes.

Exit codes: 0 success; 1 a user error (`prismq: error: ...`); 2 bad usage or a stage not built yet; 130 interrupted.
Heavy modules (torch, transformers, the pipeline) are imported only by the command that needs them, so `--help`
stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from prismq import __version__
from prismq.config import MeasureConfig, QuantizeConfig, merge_overrides, read_config_file, validate_config
from prismq.errors import PrismqError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_STAGES = {
    "probe": "measure per-Linear Fisher traces and input statistics on calibration text",
    "cost": "price every (Linear, format) pair: bytes, weight error, output error, predicted loss increase",
    "allocate": "choose a format per Linear for a sweep of budgets (Pareto frontier and knee)",
    "select": "re-decide the allocated mix on measured end-to-end KL of its least certain units (SCOUT)",
    "export": "write the chosen assignment as a sharded compressed-tensors checkpoint",
    "report": "write report.md again from a work directory's summary.json",
}
_EVAL_HELP = "compare a quantized model with its reference: KL statistics, perplexity, top-1 agreement"
_QUANTIZE_HELP = "run the whole pipeline: MODEL in, compressed-tensors checkpoint for vLLM out"
_COMPUTE_HELP = ("arithmetic dtype of forwards, backwards and KL: auto (default) computes in bf16 on GPUs and on CPUs "
                 "with native bf16 (AVX512-BF16, AMX, Arm BF16) and in fp32 elsewhere; the quantized bytes do not "
                 "depend on it")
_CHECK_HELP = ("say what prismq will do with MODEL before any compute: decision units and their formats, what stays "
               "unquantized, tensors passed through, problems (reads the config and tensor headers only)")
_FORMATS_HELP = "list the available formats: bits per weight, shape constraints, what vLLM runs them on"


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every quantize option defaults to 'not given' so config-file values survive."""
    parser = argparse.ArgumentParser(
        prog="prismq",
        description="Per-Linear mixed-precision quantization of LLMs, chosen on measured KL and exported as a "
        "compressed-tensors checkpoint that vLLM serves.",
    )
    parser.add_argument("--version", action="version", version=f"prismq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_quantize(commands)
    for name in ("allocate", "select", "export"):
        _add_quantize(commands, name)
    for name, help_line in _STAGES.items():
        if name in ("allocate", "select", "export"):
            continue
        stage = commands.add_parser(name, help=help_line, description=help_line[0].upper() + help_line[1:] + ".")
        stage.add_argument("--work-dir", type=Path, metavar="DIR", required=name in ("probe", "cost", "report"),
                           help="work directory shared by all stages (each resumes from what is there)")
        if name == "probe":
            _add_probe_flags(stage)
        if name in ("probe", "cost"):
            stage.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                               help="where to compute (default auto)")
            stage.add_argument("--compute-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                               help=_COMPUTE_HELP)
        if name == "cost":
            stage.add_argument("--formats", metavar="A,B,...",
                               help="formats to price (default: every exportable format)")
    _add_eval(commands)
    check = commands.add_parser("check", help=_CHECK_HELP, description=_CHECK_HELP[0].upper() + _CHECK_HELP[1:] + ".")
    check.add_argument("model", nargs="?", metavar="MODEL",
                       help="Hugging Face model directory; omitted: the embedded SmolLM2-135M-Instruct")
    check.add_argument("--formats", metavar="A,B,...", help="formats to offer (default NVFP4,MXFP8,BF16)")
    check.add_argument("--vision-format", metavar="FORMAT", default="BF16",
                       help="the vision tower's format, as quantize --vision-format (default BF16)")
    commands.add_parser("formats", help=_FORMATS_HELP, description=_FORMATS_HELP[0].upper() + _FORMATS_HELP[1:] + ".")
    return parser


_UP_TO = {
    "quantize": "Quantize MODEL and write a compressed-tensors checkpoint to --out.",
    "allocate": "Run quantize's stages up to the allocation (probe, cost, allocate; each resumed from the work "
                "directory) and write WORK/allocation.json, frontier.json and frontier.png.",
    "select": "Run quantize's stages up to the selection (probe, cost, allocate, select; each resumed from the work "
              "directory) and write WORK/selection.json: every flip measured and the mix selected.",
    "export": "Run quantize's stages through export and eval, resuming every finished stage from the work "
              "directory (the same as quantize).",
}


def _add_quantize(commands: Any, name: str = "quantize") -> None:
    """Add `quantize` (or a stage that runs its list up to itself) with every §1b flag, plus --max-shard-size,
    --calib-blocks/--calib-seqlen and --config."""
    sub = commands.add_parser(
        name,
        help=_QUANTIZE_HELP if name == "quantize" else _STAGES[name],
        description=_UP_TO[name] + " Settings may also come from --config FILE (JSON or TOML, same names as the "
        "flags); flags given on the command line win.",
        argument_default=argparse.SUPPRESS,
    )
    sub.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="Hugging Face model directory (safetensors) or .gguf file; omitted: the embedded SmolLM2-135M-Instruct",
    )
    sub.add_argument("--config", type=Path, metavar="FILE", help="JSON or TOML file of settings")
    sub.add_argument("--formats", metavar="A,B,...", help="candidate formats (default NVFP4,MXFP8,BF16)")
    budget = sub.add_mutually_exclusive_group()
    budget.add_argument("--target-bits", type=float, metavar="B", help="mean bits per weight over the Linears")
    budget.add_argument("--target-size", type=float, metavar="GB", help="size of the whole checkpoint in GB")
    budget.add_argument("--uniform", metavar="FORMAT", help="one format for every Linear (a baseline)")
    sub.add_argument("--rounding", choices=["rtn", "gptq", "gptq+sweep", "best"],
                     help="how weights are rounded to the format's codes: rtn (round to nearest), gptq (GPTQ on "
                     "calibration inputs, layer by layer), gptq+sweep (default: GPTQ with a per-group scale "
                     "search); best: build all three and ship the one with the lowest selection-split KL")
    sub.add_argument("--calib", metavar="FILE|DATASET", help="calibration text (default: text shipped with prismq)")
    sub.add_argument("--heldout", metavar="FILE|DATASET", help="held-out text whose KL the report states, disjoint "
                     "from the others (default: split from --calib); no decision is made on it")
    sub.add_argument("--selection", choices=["measured", "surrogate"],
                     help="measured (default): the knapsack's mix re-decided on measured end-to-end KL of the units "
                     "it is least sure of (SCOUT); surrogate: the knapsack's mix on predicted costs (the ablation)")
    sub.add_argument("--selection-text", metavar="FILE|DATASET", help="text every selection KL is measured on "
                     "(default: split from the calibration text, disjoint from it and from --heldout)")
    sub.add_argument("--selection-blocks", type=int, metavar="N", help="selection blocks (default 4)")
    sub.add_argument("--select-units", type=int, metavar="N",
                     help="decision units whose formats are measured end to end (default 16; 0: none)")
    sub.add_argument("--select-recost", type=int, metavar="N",
                     help="L2: at most N steps of re-measuring every cost with the current assignment installed "
                     "and solving again (default 2; 0: none)")
    sub.add_argument("--recost-blocks", type=int, metavar="N",
                     help="calibration blocks each re-costing step probes (default 8)")
    sub.add_argument("--polish-units", type=int, metavar="N",
                     help="polish: the N units the surrogate is least sure of, each other format measured with the "
                     "weights exactly as they ship, a move kept only if it lowers the selection KL (default 8; 0: no "
                     "polish)")
    sub.add_argument("--polish-rounds", type=int, metavar="N", help="polish: at most N moves kept (default 2)")
    sub.add_argument("--polish-margin", type=float, metavar="Z",
                     help="polish: a move is kept only if it lowers the selection-split KL by more than Z standard "
                     "errors of its paired change (default 2; 0: any lower KL)")
    sub.add_argument(
        "--force",
        nargs="+",
        action="extend",
        metavar="REGEX=FORMAT",
        help="pin the Linears whose name matches REGEX to FORMAT (first matching rule wins)",
    )
    sub.add_argument("--vision-format", metavar="FORMAT",
                     help="the vision tower's Linears of a multimodal checkpoint (default BF16: kept as stored); a "
                     "format without a static input scale (e.g. FP8) is rounded to nearest and not measured")
    sub.add_argument("--work-dir", type=Path, metavar="DIR", help="where measurements go (reused by reruns)")
    sub.add_argument("--out", type=Path, metavar="DIR", help="output checkpoint directory (required)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    sub.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute (default auto)")
    sub.add_argument("--gpus", type=int, metavar="N",
                     help="spread the probe, the cost stage, selection's measurements, GPTQ and the polish over N "
                     "GPUs of this host, one process each (default 1; under torchrun, its processes are used)")
    sub.add_argument("--compute-dtype", choices=["auto", "bf16", "fp32"], help=_COMPUTE_HELP)
    sub.add_argument("--max-shard-size", metavar="SIZE", help="largest shard, e.g. 500MB, 2GB (default 5GB)")
    sub.add_argument("--max-memory", metavar="SIZE", help="memory the streaming engine may use on the compute device, "
                     "e.g. 24GB (default: what it has free); a decoder layer that cannot fit is a clear error")
    sub.add_argument("--calib-blocks", type=int, metavar="N", help="calibration blocks for the probe (default 32)")
    sub.add_argument("--calib-seqlen", type=int, metavar="L", help="tokens per block (default 512)")
    sub.add_argument("--rounding-blocks", type=int, metavar="N",
                     help="calibration blocks that input ranges and GPTQ run on (default 32, the first N)")
    sub.add_argument("--heldout-blocks", type=int, metavar="N",
                     help="held-out blocks on which the exported checkpoint's KL is measured (default 16)")


def _add_probe_flags(sub: argparse.ArgumentParser) -> None:
    """The probe's MODEL and text flags."""
    sub.add_argument("model", nargs="?", metavar="MODEL",
                     help="HF directory or .gguf; omitted: the embedded SmolLM2-135M-Instruct")
    sub.add_argument("--calib", metavar="FILE|DATASET", help="calibration text (default: CPython docs, split)")
    sub.add_argument("--heldout", metavar="FILE|DATASET", help="held-out (report) text, disjoint from --calib")
    sub.add_argument("--selection-text", metavar="FILE|DATASET",
                     help="selection text (default: split from the calibration text)")
    defaults = MeasureConfig.model_fields
    sub.add_argument("--calib-blocks", type=int, default=defaults["calib_blocks"].default, metavar="N",
                     help="calibration blocks (default %(default)s)")
    sub.add_argument("--selection-blocks", type=int, default=defaults["selection_blocks"].default, metavar="N",
                     help="selection blocks (default %(default)s)")
    sub.add_argument("--heldout-blocks", type=int, default=defaults["heldout_blocks"].default, metavar="N",
                     help="held-out blocks (default %(default)s)")
    sub.add_argument("--seqlen", type=int, default=defaults["seqlen"].default, metavar="L",
                     help="tokens per block (default %(default)s)")
    sub.add_argument("--seed", type=int, default=defaults["seed"].default,
                     help="seed of the split and the block sampling (default %(default)s)")
    sub.add_argument("--sample-rows", type=int, default=defaults["sample_rows"].default, metavar="K",
                     help="input rows kept per Linear for measuring activation-quantization error (default "
                     "%(default)s)")


def _add_eval(commands: Any) -> None:
    """Add `eval` with the §1b flags, plus --device."""
    sub = commands.add_parser(
        "eval",
        help=_EVAL_HELP,
        description="Compare a quantized model with its reference: KL(P_ref || P_quant) over the full vocabulary at "
        "every position (mean, median, p99, p99.9, max), same-top-1 and perplexities. With --text, consecutive "
        "blocks from the start of FILE (like llama-perplexity); without, held-out blocks of the default text.",
    )
    sub.add_argument("--reference", metavar="MODEL",
                     help="the unquantized model: HF directory or .gguf; omitted: the embedded default model")
    sub.add_argument("--quantized", required=True, metavar="DIR_OR_ASSIGNMENT",
                     help="exported checkpoint directory, or a .json {\"assignment\": {linear: FORMAT}, "
                     "\"input_amax\": {linear: float}} fake-quantized in memory")
    sub.add_argument("--text", metavar="FILE", help="text evaluated in consecutive blocks from its start")
    fields = QuantizeConfig.model_fields
    sub.add_argument("--blocks", type=int, default=fields["heldout_blocks"].default, metavar="N",
                     help="number of blocks (default %(default)s)")
    sub.add_argument("--seqlen", type=int, default=fields["calib_seqlen"].default, metavar="L",
                     help="tokens per block (default %(default)s)")
    sub.add_argument("--json", type=Path, metavar="PATH", help="write the statistics as JSON here")
    sub.add_argument("--rounding", choices=["rtn", "gptq", "gptq+sweep"], default="rtn",
                     help="how an assignment file's weights are rounded (GPTQ on the default calibration blocks, "
                     "as `prismq quantize` would export them; default rtn)")
    sub.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where to compute (default auto)")
    sub.add_argument("--compute-dtype", choices=["auto", "bf16", "fp32"], default="auto", help=_COMPUTE_HELP)


def quantize_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The quantize settings from --config with the flags actually given on top (not yet validated)."""
    given = {key: value for key, value in vars(args).items() if key in QuantizeConfig.model_fields}
    config_path = getattr(args, "config", None)
    values = read_config_file(config_path) if config_path is not None else {}
    return merge_overrides(values, given)


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Validate the settings and run the pipeline (up to the allocation for `prismq allocate`)."""
    settings = quantize_settings(args)
    config = validate_config(QuantizeConfig, settings)
    early = args.command in ("allocate", "select")
    if not early and config.out is None:
        raise PrismqError("--out is required: where to write the checkpoint (or 'out' in the config file)")
    if early and config.out is None and config.work_dir is None:
        raise PrismqError("give --work-dir: where the stages keep their artifacts")
    from prismq.engine.launch import run_on_ranks
    from prismq.pipeline import quantize

    run_on_ranks(partial(quantize, config, until=args.command if early else "export"), config.gpus, config.device,
                 _show_library_messages)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Write report.md again from the work directory's summary."""
    from prismq.pipeline import report

    print(f"prismq: wrote {report(args.work_dir)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Run the KL evaluator as the flags say."""
    from prismq.measure.evaluate import run_eval

    run_eval(args.reference, args.quantized, args.text, args.blocks, args.seqlen, args.json, args.device,
             rounding=args.rounding, compute_dtype=args.compute_dtype)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    """Split the text and measure the calibration statistics into the work directory."""
    from prismq.config import validate_config
    from prismq.stages import stage_probe

    config = validate_config(MeasureConfig, {
        "model": args.model, "work_dir": args.work_dir, "calib": args.calib, "heldout": args.heldout,
        "selection_text": args.selection_text, "calib_blocks": args.calib_blocks,
        "selection_blocks": args.selection_blocks, "heldout_blocks": args.heldout_blocks, "seqlen": args.seqlen,
        "seed": args.seed, "sample_rows": args.sample_rows, "device": args.device,
        "compute_dtype": args.compute_dtype})
    print(f"prismq: probe written to {stage_probe(config)}.safetensors")
    return 0


def _cmd_cost(args: argparse.Namespace) -> int:
    """Price every (Linear, format) pair from the work directory's probe."""
    from prismq.formats import format_names
    from prismq.stages import cost_summary, stage_cost

    formats = [f.strip() for f in args.formats.split(",")] if args.formats else format_names(exportable_only=True)
    rows = stage_cost(args.work_dir, formats, args.device, args.compute_dtype)
    print(cost_summary(rows))
    print(f"prismq: {len(rows)} (Linear, format) costs in {args.work_dir / 'cost.json'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Print what prismq will do with MODEL and whether it can; exit 1 on a problem."""
    from prismq.config import QuantizeConfig
    from prismq.formats import get_format
    from prismq.model.check import check_model
    from prismq.model.checkpoint import source_formats
    from prismq.model.source import resolve_model

    formats = args.formats.split(",") if args.formats else QuantizeConfig.model_fields["formats"].default_factory()
    model_dir = resolve_model(args.model)
    offered = dict.fromkeys([*(get_format(f).name for f in formats), *source_formats(model_dir)])
    report = check_model(model_dir, list(offered), args.vision_format)
    print(report.table())
    return EXIT_ERROR if report.problems else 0


def _cmd_formats(args: argparse.Namespace) -> int:
    """Print the format registry's table."""
    from prismq.formats.registry import print_table

    print_table()
    return 0


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs `command`."""
    if command in ("quantize", "allocate", "select", "export"):
        return _cmd_quantize
    if command == "report":
        return _cmd_report
    if command == "formats":
        return _cmd_formats
    if command == "check":
        return _cmd_check
    if command == "eval":
        return _cmd_eval
    if command == "probe":
        return _cmd_probe
    if command == "cost":
        return _cmd_cost
    raise ValueError(f"no handler for command {command!r}")


class _StdoutHandler(logging.Handler):
    """The library's progress messages on standard output as `prismq: message` (the stream looked up per message,
    so a redirected stdout is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stdout, flush=True)


def _show_library_messages() -> None:
    """Route the `prismq` loggers' INFO messages to stdout, once."""
    logger = logging.getLogger("prismq")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("prismq: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `prismq` console script; returns the process exit code."""
    _show_library_messages()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _handler(args.command)(args)
    except PrismqError as exc:
        print(f"prismq: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("prismq: interrupted (nothing half-written; rerun to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())

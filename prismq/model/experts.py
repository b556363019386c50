"""Routed experts held as fused 3-D parameters, seen one expert matrix product at a time.

transformers 5 holds a MoE layer's routed experts as 3-D parameters and, with `experts_implementation="eager"`
(which prismq builds every model with, `EXPERTS_IMPLEMENTATION`), runs them as a loop over the experts that received
tokens: rows = hidden[token_idx], F.linear(rows, gate_up_proj[e]), activation, F.linear(h, down_proj[e]). There is
no module per expert to hook, so `ExpertCalls`, a torch function mode active while a layer runs, recognizes those
products by their weight (a view of a known 3-D parameter) and hands each one to a stage's callbacks as an
`ExpertCall`: which parameter and expert, and which token positions were routed there (read from the indexing of
the experts module's input). The probe records per-expert Fisher and input statistics there, rounding accumulates
each expert's Hessian, fake quantization quantizes each expert's input as the runtime does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from prismq.errors import PrismqError
from prismq.formats import Format

EXPERTS_IMPLEMENTATION = "eager"  # transformers' per-expert loop: every expert's product is one F.linear


@dataclass(frozen=True)
class ExpertCall:
    """One expert's matrix product: parameter `parameter_name` of experts module `module` (its model name), expert
    `expert`, on the input rows of token `positions` (indices into the module input's flattened tokens)."""

    module: str
    parameter_name: str
    expert: int
    positions: torch.Tensor


Before = Callable[[ExpertCall, torch.Tensor], torch.Tensor]  # may return a replaced input (quantized activations)
After = Callable[[ExpertCall, torch.Tensor, torch.Tensor], None]  # sees (input, output); may hook the output


def expert_parameters(modules: Mapping[str, nn.Module], wanted: Mapping[str, set[str]]) -> dict[int, tuple[str, str]]:
    """id(parameter) -> (module name, parameter name) for every 3-D parameter of the experts modules in `wanted`
    {module: {names}} (all of them: a product on any one tells which tokens its expert received), checking that
    the wanted ones are 3-D."""
    found = {}
    for module_name, names in wanted.items():
        module = modules[module_name]
        for name in names:
            if getattr(module, name).ndim != 3:
                raise PrismqError(f"{module_name}.{name} is not a 3-D expert parameter")
        found.update({id(p): (module_name, name) for name, p in module.named_parameters(recurse=False) if p.ndim == 3})
    return found


def parameters_of(slots: Iterable[tuple[str, str, int]]) -> dict[str, set[str]]:
    """{experts module: {parameter names}} (what `ExpertCalls` watches) of (module, parameter, expert) slots."""
    wanted: dict[str, set[str]] = {}
    for module_name, parameter_name, _ in slots:
        wanted.setdefault(module_name, set()).add(parameter_name)
    return wanted


def quantize_expert_inputs(modules: Mapping[str, nn.Module],
                           inputs: Mapping[tuple[str, str, int], tuple[Format, torch.Tensor | None]]
                           ) -> list[RemovableHandle]:
    """Hooks quantizing each expert product's input as the runtime does: `inputs` maps a (module, parameter,
    expert) slot to its format and static input scale (None: dynamic); slots absent run unquantized."""
    if not inputs:
        return []

    def quantize(call: ExpertCall, x: torch.Tensor) -> torch.Tensor:
        found = inputs.get((call.module, call.parameter_name, call.expert))
        if found is None:
            return x
        fmt, scale = found
        return fmt.qdq_activation(x, None if scale is None else scale.to(x.device))

    return ExpertCalls(modules, parameters_of(inputs), before=quantize).attach()


class ExpertCalls(TorchFunctionMode):
    """Calls `before` and `after` around every F.linear whose weight is one expert's slice of the 3-D parameters of
    `modules` named in `wanted` ({experts module name: {parameter names}}), while one of those experts modules
    runs: `attach` makes each of them enter this mode when its forward starts and leave it when it ends, as a
    module hook would (remove the returned handles to stop)."""

    def __init__(self, modules: Mapping[str, nn.Module], wanted: Mapping[str, set[str]],
                 before: Before | None = None, after: After | None = None) -> None:
        super().__init__()
        self.parameters = expert_parameters(modules, wanted)
        self.wanted = {(module, name) for module, names in wanted.items() for name in names}
        self.before, self.after = before, after
        self._modules = {name: modules[name] for name in wanted}
        self._input: dict[str, torch.Tensor] = {}  # experts module running -> the hidden states it runs on
        # per experts module, the last rows taken from its input and their positions (only the last: the product
        # that uses them follows at once, and keeping every expert's rows would hold the layer's routed activations)
        self._routed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: dict[tuple[str, int], torch.Tensor] = {}  # (module, expert) -> positions of its last rows

    def attach(self) -> list[RemovableHandle]:
        """Hooks on the experts modules that turn this mode on for the duration of each of their forwards."""
        handles = []
        for name, module in self._modules.items():
            handles.append(module.register_forward_pre_hook(self._started(name)))
            handles.append(module.register_forward_hook(self._finished(name), always_call=True))
        return handles

    def _started(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            self._input[name] = args[0]
            self._routed.pop(name, None)
            self.__enter__()
        return hook

    def _finished(self, name: str):
        def hook(_module: nn.Module, _args: tuple, _output: Any) -> None:
            self.__exit__(None, None, None)
            self._input.pop(name, None)
            self._routed.pop(name, None)
            self._last = {key: value for key, value in self._last.items() if key[0] != name}
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and self._input:
            result = func(*args, **kwargs)
            index = args[1] if len(args) > 1 else None
            if isinstance(index, torch.Tensor) and index.ndim == 1 and not index.is_floating_point():
                for module, hidden in self._input.items():
                    if args[0] is hidden:
                        self._routed[module] = (result, index)
            return result
        if func is F.linear and len(args) >= 2 and args[1]._base is not None:
            found = self.parameters.get(id(args[1]._base))
            if found is not None:
                return self._expert_linear(found, func, args, kwargs)
        return func(*args, **kwargs)

    def _expert_linear(self, found: tuple[str, str], func, args: tuple, kwargs: dict) -> torch.Tensor:  # noqa: ANN001
        module, parameter_name = found
        weight, base = args[1], args[1]._base
        expert = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
        x = args[0]
        routed = self._routed.get(module)
        positions = routed[1] if routed is not None and routed[0] is x else self._last.get((module, expert))
        if positions is None:
            raise PrismqError(f"{module}: cannot tell which tokens expert {expert} received (its input rows are "
                              "not an indexing of the experts' input); this experts implementation is not supported")
        self._last[(module, expert)] = positions
        if (module, parameter_name) not in self.wanted:
            return func(*args, **kwargs)
        call = ExpertCall(module, parameter_name, expert, positions)
        if self.before is not None:
            x = self.before(call, x)
        out = func(x, *args[1:], **kwargs)
        if self.after is not None:
            self.after(call, x, out)
        return out

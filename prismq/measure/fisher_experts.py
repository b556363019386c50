"""The Fisher probe for routed experts: per-token, per-expert Fisher and input statistics over the tokens routed
to each expert, recorded from `ExpertCalls` (an expert is a slice of a fused 3-D parameter, not a module to hook).

For expert target k (one expert's gate, up or down) the same sums as a Linear's (`prismq.measure.fisher`) run over
the tokens routed to that expert: fisher_out_i = (1/T) sum_{t routed} dy_ti^2 ||x_t||^2, x_sq_j = (1/T) sum_{t
routed} x_tj^2, T = every calibration token. Dividing by T, not by the routed count, keeps the predicted loss
increase a per-token average over the text, as every other target's, so a rarely used expert weighs less.

x_token_max is each calibration token's max |x| where the token reached the expert and -1 where it did not. The
input sample is a uniform sample of the routed tokens' inputs: every calibration position gets a seeded random key
up front and each expert keeps the `rows` routed positions with the smallest keys (bottom-k sampling, independent
of block order and device); an expert that received fewer tokens repeats its rows to fill the sample, and one that
received none has a zero sample and zero Fisher (it is reported: nothing calibrates it). Samples are kept in the
checkpoint's dtype (bf16, as the runtime's activations are): a model has many experts, each with its own sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from prismq.engine.distributed import Ranks
from prismq.measure.fisher import FISHER_OUT, FISHER_TRACE, X_ABSMAX, X_SAMPLE, X_SQ, X_TOKEN_MAX
from prismq.model.experts import ExpertCall, parameters_of
from prismq.model.targets import Target

ROUTED_TOKENS = "routed_tokens"  # suffix of each expert target's count of routed calibration tokens


@dataclass
class _ExpertState:
    """Running sums for one expert parameter slice (all rows of the expert's matrix in that parameter)."""

    fisher_out: torch.Tensor  # [rows of the expert's matrix] fp64
    x_sq: torch.Tensor  # [in] fp64
    x_absmax: torch.Tensor  # [] fp32
    x_token_max: torch.Tensor  # [T] fp32, -1 where not routed
    sample: torch.Tensor  # [k, in] compute dtype
    sample_keys: torch.Tensor  # [k] fp64, +inf where unfilled
    routed: int = 0


class ExpertRecorder:
    """`ExpertCalls`' `after` callback filling every expert target's statistics, batch by batch."""

    def __init__(self, targets: Mapping[str, Target], seqlen: int, sample_rows: int, total: int, seed: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.targets, self.seqlen, self.total = dict(targets), seqlen, total
        self.token_rows = torch.arange(seqlen, device=device)  # the global position of each row of the batch
        self.keys = torch.rand(total, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
        rows: dict[tuple[str, str, int], int] = {}  # each slot's rows: the largest row any of its targets ends at
        for target in self.targets.values():
            rows[_slot(target)] = max(rows.get(_slot(target), 0), (target.rows or (0, target.shape[0]))[1])
        self.states: dict[tuple[str, str, int], _ExpertState] = {}
        for target in self.targets.values():
            if _slot(target) not in self.states:
                self.states[_slot(target)] = _ExpertState(
                    fisher_out=torch.zeros(rows[_slot(target)], dtype=torch.float64, device=device),
                    x_sq=torch.zeros(target.shape[1], dtype=torch.float64, device=device),
                    x_absmax=torch.zeros((), dtype=torch.float32, device=device),
                    x_token_max=torch.full((total,), -1.0, dtype=torch.float32, device=device),
                    sample=torch.zeros(sample_rows, target.shape[1], dtype=dtype, device=device),
                    sample_keys=torch.full((sample_rows,), float("inf"), dtype=torch.float64, device=device))

    @property
    def parameters(self) -> dict[str, set[str]]:
        """The 3-D parameters to watch, {experts module: {parameter names}} (what `ExpertCalls` takes)."""
        return parameters_of(self.states)

    def start(self, token_rows: torch.Tensor) -> None:
        """Record the next calls as the batch whose rows are at global positions `token_rows` (`batch_rows`)."""
        self.token_rows = token_rows

    def __call__(self, call: ExpertCall, x: torch.Tensor, out: torch.Tensor) -> None:
        state = self.states.get((call.module, call.parameter_name, call.expert))
        if state is None:
            return
        rows = x.detach()
        squares = rows.to(torch.float32, copy=True).square_()
        norm_sq = squares.sum(dim=1)
        positions = self.token_rows[call.positions.to(self.token_rows.device)]
        state.routed += rows.shape[0]
        state.x_sq += squares.sum(dim=0)
        if rows.shape[0]:
            torch.maximum(state.x_absmax, rows.abs().amax().float(), out=state.x_absmax)
        state.x_token_max[positions] = rows.abs().amax(dim=-1).float()
        keys = torch.cat([state.sample_keys, self.keys[positions]])
        kept = torch.topk(keys, state.sample_keys.numel(), largest=False, sorted=True).indices
        state.sample_keys = keys[kept]
        state.sample = torch.cat([state.sample, rows.to(state.sample.dtype)])[kept]
        if out.requires_grad:
            def accumulate(grad: torch.Tensor) -> None:
                dy_sq = grad.detach().to(torch.float32, copy=True).square_()  # [routed, rows]
                state.fisher_out += norm_sq @ dy_sq
            out.register_hook(accumulate)

    def merge(self, ranks: Ranks) -> None:
        """Combine the statistics of processes that each recorded other blocks: sums added, maxima taken (a token
        no rank routed here stays -1), and the sample the rows with the smallest keys among every rank's (the
        keys are per position, the same on every rank: the sample one process would keep)."""
        if ranks.world == 1:
            return
        for state in self.states.values():
            ranks.reduce_(state.fisher_out, "sum")
            ranks.reduce_(state.x_sq, "sum")
            ranks.reduce_(state.x_absmax, "max")
            ranks.reduce_(state.x_token_max, "max")
            state.routed = int(ranks.reduce_(torch.tensor(state.routed, dtype=torch.int64), "sum"))
            keys = torch.cat(ranks.everyone(state.sample_keys))
            kept = torch.topk(keys, state.sample_keys.numel(), largest=False, sorted=True).indices
            state.sample_keys = keys[kept]
            state.sample = torch.cat(ranks.everyone(state.sample))[kept]

    def results(self) -> dict[str, torch.Tensor]:
        """Every expert target's statistics (NAME.fisher_out, ..., NAME.routed_tokens), normalized by the token
        count, on the CPU."""
        out: dict[str, torch.Tensor] = {}
        for name, target in self.targets.items():
            state = self.states[_slot(target)]
            start, stop = target.rows or (0, target.shape[0])
            fisher_out = state.fisher_out[start:stop] / self.total
            filled = int(torch.isfinite(state.sample_keys).sum())
            sample = state.sample
            if 0 < filled < sample.shape[0]:
                sample = sample[torch.arange(sample.shape[0], device=sample.device) % filled]
            out[f"{name}.{FISHER_OUT}"] = fisher_out.float().cpu()
            out[f"{name}.{FISHER_TRACE}"] = fisher_out.sum().float().cpu()
            out[f"{name}.{X_SQ}"] = (state.x_sq / self.total).float().cpu()
            out[f"{name}.{X_ABSMAX}"] = state.x_absmax.cpu()
            out[f"{name}.{X_SAMPLE}"] = sample.cpu()
            out[f"{name}.{X_TOKEN_MAX}"] = state.x_token_max.cpu()
            out[f"{name}.{ROUTED_TOKENS}"] = torch.tensor(state.routed)
        return out


def _slot(target: Target) -> tuple[str, str, int]:
    """The expert parameter slice a target lies in: (experts module, parameter name, expert)."""
    return target.module, target.parameter_name, int(target.expert)  # type: ignore[arg-type]

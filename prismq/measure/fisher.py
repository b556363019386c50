"""The Fisher probe: per-Linear empirical Fisher from per-token squared gradients, plus input statistics.

For a Linear y = x W^T the weight gradient of a block's loss is sum_t dy_t ⊗ x_t, with dy_t = dLoss/dy at position t.
Squaring that sum (what earlier tools did) lets gradients of different tokens cancel and understates sensitivity;
the probe squares every token's contribution separately:

    F_ij = (1/T) sum_t dy_ti^2 x_tj^2                      (the per-token empirical Fisher diagonal)
    fisher_out_i = sum_j F_ij = (1/T) sum_t dy_ti^2 ||x_t||^2,   fisher_trace = sum_i fisher_out_i

Loss = the summed next-token NLL of each calibration block (labels = the block shifted by one), so dy_t is the
gradient of the block's summed loss; T = N*L, every calibration position (the last position of a block predicts
nothing, so its dy is zero, but its input still counts in the input statistics and the sample).

Nothing of size [out, in] is ever formed and no parameter gets a `.grad`: parameters are frozen, the graph exists
because the input embeddings require grad, a forward hook on each Linear records ||x_t||^2 and the input statistics,
and a tensor hook on its output y receives dy and adds (dy^2)^T ||x||^2 into a preallocated buffer. Precision: each
block's sums are fp32 (dy and x upcast before squaring), the running totals over blocks are fp64; outputs are fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from prismq.engine.distributed import Ranks
from prismq.errors import PrismqError
from prismq.model.siblings import sample_owner

# Suffixes of the tensors `probe` returns for each Linear NAME (NAME.fisher_out, ...).
FISHER_OUT = "fisher_out"
FISHER_TRACE = "fisher_trace"
X_SQ = "x_sq"
X_ABSMAX = "x_absmax"
X_SAMPLE = "x_sample"
X_TOKEN_MAX = "x_token_max"


def sample_positions(total: int, rows: int, seed: int) -> torch.Tensor:
    """`min(rows, total)` distinct token positions drawn uniformly from range(total) under `seed`, sorted.

    Drawn up front (not reservoir-sampled) so the sample is identical whatever the block order or device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[: min(rows, total)].sort().values


@dataclass
class _LinearState:
    """Running sums for one Linear, on its weight's device."""

    fisher_out: torch.Tensor  # [out] fp64: sum_t dy_ti^2 ||x_t||^2
    x_sq: torch.Tensor  # [in] fp64: sum_t x_tj^2
    x_absmax: torch.Tensor  # [] fp32
    x_sample: torch.Tensor  # [rows, in] model dtype
    x_token_max: torch.Tensor  # [N*L] fp32: max_j |x_tj| of every calibration token, in block order
    calls: int = 0


@dataclass
class _InputStats:
    """What one Linear input contributes in a block; fused siblings (q/k/v, gate/up) get the same input tensor,
    so it is computed once for them."""

    norm_sq: torch.Tensor  # [rows] fp32 ||x_t||^2
    col_sq: torch.Tensor  # [in] fp32 sum_t x_tj^2
    absmax: torch.Tensor  # [] fp32
    token_max: torch.Tensor  # [rows] fp32
    sample: torch.Tensor | None  # [rows sampled from this batch, in] model dtype


class Recorder:
    """Forward and tensor hooks that fill every Linear's `_LinearState` batch by batch (a batch: one or more
    blocks run together)."""

    def __init__(self, modules: dict[str, nn.Linear], seqlen: int, sample_rows: int, total: int,
                 device: torch.device | None = None) -> None:
        """`device`: where the sums live (default: each Linear's weight device; a streamed model's Linears are on
        the meta device until their layer is read)."""
        self.seqlen = seqlen
        self.states = {
            name: _LinearState(
                fisher_out=torch.zeros(m.out_features, dtype=torch.float64, device=device or m.weight.device),
                x_sq=torch.zeros(m.in_features, dtype=torch.float64, device=device or m.weight.device),
                x_absmax=torch.zeros((), dtype=torch.float32, device=device or m.weight.device),
                x_sample=torch.zeros(sample_rows, m.in_features, dtype=m.weight.dtype,
                                     device=device or m.weight.device),
                x_token_max=torch.zeros(total, dtype=torch.float32, device=device or m.weight.device),
            )
            for name, m in modules.items()
        }
        self.slots = torch.zeros(0, dtype=torch.long)  # this batch's sample slots and their rows in the batch
        self.local = torch.zeros(0, dtype=torch.long)
        self.token_rows = torch.zeros(0, dtype=torch.long)  # the global position of each row of the batch
        self._last: tuple[torch.Tensor, int, _InputStats] | None = None  # the last input seen, for siblings

    def forget(self) -> None:
        """Drop the reference to the last input seen (a layer's widest activation): the hooks left on the outputs
        would otherwise keep it alive after the layer is done."""
        self._last = None

    def merge(self, ranks: Ranks) -> None:
        """Combine the sums of processes that each recorded other blocks (`prismq.engine.distributed`): sums
        added, maxima taken, sampled rows and per-token maxima each filled by one rank (zeros elsewhere) added."""
        if ranks.world == 1:
            return
        for state in self.states.values():
            for total in (state.fisher_out, state.x_sq, state.x_sample, state.x_token_max):
                ranks.reduce_(total, "sum")
            ranks.reduce_(state.x_absmax, "max")
            state.calls = int(ranks.reduce_(torch.tensor(state.calls, dtype=torch.int64), "sum"))

    def start(self, positions: torch.Tensor, indices: list[int], device: torch.device) -> None:
        """Record the next forward as blocks `indices` run as one batch (in that order): which of the sampled global
        `positions` fall in them and where, and the global position of every row; forget the last input."""
        self.token_rows, self.slots, self.local = batch_rows(positions, indices, self.seqlen, device)
        self._last = None

    def input_stats(self, given: torch.Tensor) -> _InputStats:
        """The statistics of a Linear's input [..., in] (one batch), reused when the previous Linear got this very
        tensor (same object, not modified since)."""
        if self._last is not None and self._last[0] is given and self._last[1] == given._version:
            return self._last[2]
        x = given.detach().reshape(self.token_rows.numel(), -1)
        squares = x.to(torch.float32, copy=True).square_()  # [rows, in]; a copy, so fp32 inputs stay untouched
        low, high = torch.aminmax(x)
        stats = _InputStats(norm_sq=squares.sum(dim=1), col_sq=squares.sum(dim=0),
                            absmax=torch.maximum(-low, high).float(), token_max=x.abs().amax(dim=-1).float(),
                            sample=x[self.local] if self.slots.numel() else None)
        self._last = (given, given._version, stats)
        return stats

    def forward_hook(self, name: str):
        """A forward hook for Linear `name`: input statistics now, and a hook on y for the Fisher on backward."""
        state = self.states[name]

        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if x.numel() != self.token_rows.numel() * x.shape[-1]:
                raise PrismqError(f"{name} saw {x.numel() // x.shape[-1]} input rows for {self.token_rows.numel()} "
                                  "tokens; the probe needs every Linear to see each token once (routed experts "
                                  "are not Linears)")
            if not output.requires_grad:
                raise PrismqError(f"{name}: its output does not depend on the input embeddings; cannot probe it")
            state.calls += self.token_rows.numel() // self.seqlen
            stats = self.input_stats(x)
            state.x_sq += stats.col_sq
            torch.maximum(state.x_absmax, stats.absmax, out=state.x_absmax)
            state.x_token_max[self.token_rows] = stats.token_max
            if stats.sample is not None:
                state.x_sample[self.slots] = stats.sample.to(state.x_sample.dtype)
            norm_sq = stats.norm_sq  # kept alive by the hook below until the backward has run

            def accumulate(grad: torch.Tensor) -> None:
                dy_sq = grad.detach().reshape(norm_sq.numel(), -1).to(torch.float32, copy=True).square_()  # [rows, out]
                state.fisher_out += norm_sq @ dy_sq  # sum_t ||x_t||^2 dy_t^2, fp32 within the batch

            output.register_hook(accumulate)

        return hook


def batch_rows(positions: torch.Tensor, indices: list[int], seqlen: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For blocks `indices` run as one batch: the global position of each of its rows (block after block), which
    of the sampled global `positions` fall in it, and the row each of those is, all on `device`."""
    order = torch.tensor(indices, dtype=torch.long)
    token_rows = (order.unsqueeze(1) * seqlen + torch.arange(seqlen)).flatten()
    match = (positions // seqlen).unsqueeze(1) == order.unsqueeze(0)  # [sampled, batch]
    slots = match.any(dim=1).nonzero().flatten()
    local = match[slots].int().argmax(dim=1) * seqlen + positions[slots] % seqlen
    return token_rows.to(device), slots.to(device), local.to(device)


def nll_sum(logits: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one block (fp32 log-softmax): position t predicts token t+1."""
    return nn.functional.cross_entropy(logits[0, :-1].float(), block[1:], reduction="sum")


def probe(model: nn.Module, blocks: torch.Tensor, names: list[str], *, sample_rows: int = 128, seed: int = 0,
          progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-token empirical Fisher and input statistics of the named Linears over calibration `blocks` [N, L].

    Returns, per Linear NAME (fp32 on the CPU unless noted): NAME.fisher_out [out], NAME.fisher_trace [],
    NAME.x_sq [in] (E[x_j^2] over all N*L tokens), NAME.x_absmax [], NAME.x_token_max [N*L] (each token's max |x|,
    block after block: the clip calibration's candidates) and NAME.x_sample [min(sample_rows, N*L), in]
    (in the model dtype: input rows at positions drawn uniformly over all N*L, seeded, without replacement, in
    position order). Also "loss" []: the mean next-token NLL over the N*(L-1) predicted tokens. One block per
    forward/backward; the model is left as it was (parameters, requires_grad flags and train/eval mode) and no
    parameter gets a `.grad`. Why per token: see the module docstring."""
    check_blocks(blocks, sample_rows)
    all_modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(all_modules.get(n), nn.Linear)]
    if missing:
        raise PrismqError(f"not Linear modules of this model: {', '.join(missing[:3])}")
    n_blocks, seqlen = blocks.shape
    total = n_blocks * seqlen
    modules = {name: all_modules[name] for name in names}
    recorder = Recorder(modules, seqlen, min(sample_rows, total), total)
    positions = sample_positions(total, sample_rows, seed)
    embed = model.get_input_embeddings()
    device = embed.weight.device

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [m.register_forward_hook(recorder.forward_hook(name)) for name, m in modules.items()]
    nll_total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        bar = tqdm(range(n_blocks), desc="probe", unit="block", disable=not progress)
        for index in bar:
            recorder.start(positions, [index], device)
            block = blocks[index].to(device)
            with torch.enable_grad():
                embeds = embed(block.unsqueeze(0)).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                loss = nll_sum(logits, block)
                del logits
                torch.autograd.grad(loss, [embeds])  # fires the output hooks; accumulates into no .grad
            nll_total += loss.detach()
            del embeds, loss  # frees the block's graph, and with it the hooks' ||x_t||^2
            if progress:
                bar.set_postfix(nll=f"{nll_total.item() / ((index + 1) * (seqlen - 1)):.3f}", refresh=False)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    if with_grad:  # pragma: no cover - a guard on the mechanism, not reachable through the API
        raise PrismqError(f"internal error: the probe left a .grad on {with_grad[0]}")
    return _results(recorder, n_blocks, total, nll_total / (n_blocks * (seqlen - 1)))


def check_blocks(blocks: torch.Tensor, sample_rows: int) -> None:
    """Refuse token blocks the probe cannot use and a negative sample size."""
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise PrismqError(f"probe needs token blocks [N, L] with L >= 2, got shape {tuple(blocks.shape)}")
    if sample_rows < 0:
        raise PrismqError(f"sample_rows must be >= 0, got {sample_rows}")


def _results(recorder: Recorder, n_blocks: int, total: int, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalize the running sums by the token count and move them to the CPU, with the mean loss."""
    stats = linear_results(recorder, n_blocks, total)
    return {"loss": loss.float().cpu(), **once_per_input(stats, list(recorder.states))}


def once_per_input(stats: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """`stats` without the input statistics that repeat a sibling's (q/k/v, gate/up, an expert's gate/up read one
    input: its sampled rows and per-token maxima are kept once, under `sample_owner`: a third of a dense layer's
    and half of an MoE layer's)."""
    repeated = {f"{name}.{kind}" for name in names for kind in (X_SAMPLE, X_TOKEN_MAX)
                if sample_owner(name) != name and f"{sample_owner(name)}.{kind}" in stats}
    return {key: value for key, value in stats.items() if key not in repeated}


def input_statistic(stats: Mapping[str, torch.Tensor], name: str, kind: str) -> torch.Tensor | None:
    """Input statistic `kind` (X_SAMPLE, X_TOKEN_MAX) of target `name` in a probe's tensors: its own, or the one
    its input's owner keeps (`once_per_input`); None if neither is there."""
    for key in (f"{sample_owner(name)}.{kind}", f"{name}.{kind}"):
        if key in stats:
            return stats[key]
    return None


def linear_results(recorder: Recorder, n_blocks: int, total: int) -> dict[str, torch.Tensor]:
    """Every recorded Linear's statistics (NAME.fisher_out, ...) normalized by the token count, on the CPU, checking
    every Linear ran once per block (a Linear that ran twice or never would make the per-token averages wrong)."""
    out: dict[str, torch.Tensor] = {}
    for name, state in recorder.states.items():
        if state.calls != n_blocks:
            raise PrismqError(f"{name} ran {state.calls} times over {n_blocks} blocks; the probe needs each Linear "
                              "to run once per forward")
        fisher_out = state.fisher_out / total
        out[f"{name}.{FISHER_OUT}"] = fisher_out.float().cpu()
        out[f"{name}.{FISHER_TRACE}"] = fisher_out.sum().float().cpu()
        out[f"{name}.{X_SQ}"] = (state.x_sq / total).float().cpu()
        out[f"{name}.{X_ABSMAX}"] = state.x_absmax.cpu()
        out[f"{name}.{X_SAMPLE}"] = state.x_sample.cpu()
        out[f"{name}.{X_TOKEN_MAX}"] = state.x_token_max.cpu()
        if not math.isfinite(float(out[f"{name}.{FISHER_TRACE}"])):
            raise PrismqError(f"{name}: the Fisher trace is not finite (overflow in the model dtype?)")
    return out

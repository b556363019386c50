"""The Fisher probe on a streamed model: the per-token Fisher of `prismq.measure.fisher.probe`, one decoder layer in
memory at a time, resumable after any layer.

A forward walk saves each decoder layer's input (per batch of blocks) to the walk state on disk; the output head
gives each block's summed next-token loss and its gradient at the last layer's output; a reverse walk reads each
layer's saved input, re-runs the layer with autograd and back-propagates the incoming gradient, the Linears' hooks
recording the same per-token Fisher and input statistics as the whole-model backward. After each reverse step the
layer's statistics and the gradient at its input are saved and its kept input deleted, so memory holds one layer,
one layer's hidden states and one layer's statistics, and a killed run resumes at the layer it was in. Blocks go
through a layer `BATCH_BLOCKS` at a time: on a GPU a small model's layer is bound by kernel launches, not FLOPs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from prismq.engine.distributed import Ranks
from prismq.engine.stream import BATCH_BLOCKS, LayerStream, run_layer
from prismq.engine.walkstate import WalkState, pack, unpack
from prismq.errors import PrismqError
from prismq.measure.fisher import Recorder, check_blocks, linear_results, nll_sum, once_per_input, sample_positions
from prismq.measure.fisher_experts import ExpertRecorder
from prismq.model.experts import ExpertCalls

GRAD = "grad"  # the gradient at the input of the lowest layer done so far (meta: that layer, the summed loss)
SCRATCH_PREFIX = ".probe-rank"  # a rank's temporary walk directory, beside the work directory's walks


def remove_scratch(directory: Path) -> None:
    """Delete the ranks' temporary probe walks a killed run left in `directory` (each holds layer inputs: on a
    large model, many GB). Only while no walk runs: the leader, before it hands a probe out."""
    for leftover in Path(directory).glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def probe_streamed(stream: LayerStream, blocks: torch.Tensor, names: list[str], *, sample_rows: int = 128,
                   seed: int = 0, progress: bool = True, state: WalkState | None = None,
                   ranks: Ranks | None = None, batch_blocks: int = BATCH_BLOCKS) -> Mapping[str, torch.Tensor]:
    """`probe` on a streamed model, with the same results (see the module docstring; bit for bit with
    `batch_blocks` 1, else to fp32 rounding: `batch_blocks` blocks run through a layer together and their sums are
    taken in fp32 together). `state`: where the walk keeps its per-layer inputs and progress (a rerun with the same
    state and `batch_blocks` resumes); None: a temporary directory.
    `ranks` (default: the initialized process group's, else one process): the single process's batches of blocks
    are divided among the processes (each walks its own, in a temporary directory of its own: `Ranks.own`), and
    after each layer their sums are combined, so every rank gets the statistics one process gets (samples and
    maxima exactly; sums taken in another order: equal to rounding); a rank without a batch walks empty-handed.
    Several processes keep their walks in temporary directories beside `state`'s."""
    ranks = ranks or Ranks.current()
    check_blocks(blocks, sample_rows)
    missing = [n for n in names if n not in stream.targets]
    if missing:
        raise PrismqError(f"not quantization targets of this model: {', '.join(missing[:3])}")
    own = ranks.own(state)
    if own is None:  # a walk of its own, beside the work directory's if there is one (it holds layer inputs)
        where = None if state is None else state.directory.parent
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{ranks.rank}-", dir=where) as scratch:
            walked = _walk(stream, blocks, names, sample_rows, seed, progress, batch_blocks, ranks,
                           WalkState(Path(scratch) / "probe.walk", {}))
            return {key: walked[key] for key in walked}  # read from the directory before it goes
    return _walk(stream, blocks, names, sample_rows, seed, progress, batch_blocks, ranks, own)


def _walk(stream: LayerStream, blocks: torch.Tensor, names: list[str], sample_rows: int, seed: int, progress: bool,
          batch_blocks: int, ranks: Ranks, state: WalkState) -> Mapping[str, torch.Tensor]:
    """`probe_streamed` keeping its walk in `state`."""
    state = WalkState(state.directory, {**state.expect, "batch_blocks": batch_blocks})
    walk = _ProbeWalk(stream, blocks, names, sample_rows, seed, state, progress and ranks.leader, ranks, batch_blocks)
    done = state.load(GRAD)
    if done is None:
        walk.forward()
        done = state.load(GRAD)
        assert done is not None
    walk.backward(unpack(done[0], GRAD, stream.device, stream.dtype), done[1]["layer"], done[1]["nll"])
    own_nll = state.load(GRAD)[1]["nll"]  # type: ignore[index]  # this rank's blocks'
    nll = float(ranks.reduce_(torch.tensor(own_nll, dtype=torch.float64), "sum"))
    layers = []
    for index in range(len(stream)):
        stats = state.load(f"stats-{index}")
        if stats is None:
            raise PrismqError(f"the probe's statistics of layer {index} are missing from {state.directory}; delete "
                              "that directory to redo the probe")
        layers.append(stats[0])
    loss = torch.tensor(nll / (blocks.shape[0] * (blocks.shape[1] - 1)))
    return ChainMap({"loss": loss}, *layers)  # the layers' statistics stay on disk until read


class _ProbeWalk:
    """The two sweeps of one streamed probe over `blocks`, saving their progress in `state`."""

    def __init__(self, stream: LayerStream, blocks: torch.Tensor, names: list[str], sample_rows: int, seed: int,
                 state: WalkState, progress: bool, ranks: Ranks, batch_blocks: int) -> None:
        self.stream, self.names, self.state, self.progress, self.ranks = stream, names, state, progress, ranks
        self.seed, self.n_blocks, self.seqlen = seed, blocks.shape[0], blocks.shape[1]
        # the single process's batches, dealt among the ranks whole: each block computed as one process computes it
        batches = [list(range(start, min(start + batch_blocks, blocks.shape[0])))
                   for start in range(0, blocks.shape[0], batch_blocks)]
        self.batches = [batch for number, batch in enumerate(batches) if ranks.mine(number)]
        self.blocks = blocks[[index for batch in self.batches for index in batch]]
        self.total = blocks.numel()
        self.rows = min(sample_rows, self.total)
        self.positions = sample_positions(self.total, sample_rows, seed)
        with torch.no_grad():  # a rank left without a batch (fewer batches than ranks) still joins every merge
            first = stream.first_inputs(self.blocks, batch_blocks) if self.batches else []
        self.kwargs = [k for _, k in first]
        self.first = [h for h, _ in first]

    def _input(self, index: int) -> list[torch.Tensor] | None:
        """The saved input of layer `index` (per batch), None if not saved."""
        found = self.state.load(f"input-{index}")
        return None if found is None else unpack(found[0], "hidden", self.stream.device, self.stream.dtype)

    def forward(self) -> None:
        """Run the layers from the last saved input on, saving each layer's input; then the head's loss and its
        gradient at the last layer's output."""
        start = next((i for i in range(len(self.stream), 0, -1) if self.state.exists(f"input-{i}")), 0)
        hidden = self._input(start) if start else None
        if hidden is None:
            start, hidden = 0, self.first
            self.state.save("input-0", pack("hidden", hidden))
        for index in tqdm(range(start, len(self.stream)), initial=start, total=len(self.stream),
                          desc="probe (forward)", unit="layer", disable=not self.progress):
            with torch.no_grad(), self.stream.layer(index) as layer:
                hidden = [h for h, _ in run_layer(layer, list(zip(hidden, self.kwargs)))]
            self.state.save(f"input-{index + 1}", pack("hidden", hidden))
        grads, nll = [], 0.0
        for block, last in zip(self.blocks, (row.unsqueeze(0) for batch in hidden for row in batch)):
            with torch.enable_grad():  # one block at a time: the logits are vocabulary-wide
                last = last.detach().requires_grad_(True)
                loss = nll_sum(self.stream.head(self.stream.final_hidden(last)), block.to(self.stream.device))
                grads.append(torch.autograd.grad(loss, [last])[0])
            nll += float(loss.detach().double())
        grads = [torch.cat(grads[start:start + len(b)]) for start, b in zip(self._starts(), self.batches)]
        self.state.save(GRAD, pack(GRAD, grads), layer=len(self.stream), nll=nll)
        self.state.remove(f"input-{len(self.stream)}")

    def backward(self, grads: list[torch.Tensor], above: int, nll: float) -> None:
        """Back-propagate `grads` (at the input of layer `above`) down to layer 0, saving each layer's statistics,
        then the gradient at its input (with the blocks' summed loss `nll`)."""
        stream = self.stream
        for index in tqdm(reversed(range(above)), initial=len(stream) - above, total=len(stream),
                          desc="probe (backward)", unit="layer", disable=not self.progress):
            inputs = self._input(index)
            if inputs is None:
                raise PrismqError(f"the probe's saved input of layer {index} is missing from {self.state.directory};"
                                  " delete that directory to redo the probe")
            with stream.layer(index) as layer:
                layer.requires_grad_(False)
                modules = stream.layer_names(index, layer)
                own = {n: stream.targets[n] for n in self.names if stream.targets[n].module in modules}
                linears = {n: modules[t.module] for n, t in own.items() if t.expert is None}
                recorder = Recorder(linears, self.seqlen, self.rows, self.total, stream.device)
                experts = ExpertRecorder({n: t for n, t in own.items() if t.expert is not None},
                                         self.seqlen, self.rows, self.total, self.seed, stream.device,
                                         stream.weight_dtype)
                handles = [module.register_forward_hook(recorder.forward_hook(n)) for n, module in linears.items()]
                if experts.targets:
                    handles += ExpertCalls(modules, experts.parameters, after=experts).attach()
                try:
                    for batch_index, (x, kwargs) in enumerate(zip(inputs, self.kwargs)):
                        recorder.start(self.positions, self.batches[batch_index], stream.device)
                        experts.start(recorder.token_rows)
                        with torch.enable_grad():
                            x = x.detach().requires_grad_(True)
                            out = layer(x, **kwargs)
                            out = out[0] if isinstance(out, tuple) else out
                            grads[batch_index] = torch.autograd.grad(out, [x], grad_outputs=grads[batch_index])[0]
                finally:
                    for handle in handles:
                        handle.remove()
                    recorder.forget()
            recorder.merge(self.ranks)
            experts.merge(self.ranks)
            stats = {**linear_results(recorder, self.n_blocks, self.total), **experts.results()}
            self.state.save(f"stats-{index}", once_per_input(stats, list(own)))
            self.state.save(GRAD, pack(GRAD, grads), layer=index, nll=nll)
            self.state.remove(f"input-{index}")

    def _starts(self) -> list[int]:
        """Where each batch's first block is in this rank's blocks."""
        return [sum(len(b) for b in self.batches[:i]) for i in range(len(self.batches))]

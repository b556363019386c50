"""KL(P_ref || P_quant) over the full vocabulary at every position (DESIGN.md §6), memory-bounded.

Each model is split into its trunk (token ids -> final hidden states) and its head (the output embedding): the
trunk runs once per block, the head and an fp32 log-softmax run on `chunk_size` positions at a time. Reference
log-probabilities of a chunk are computed once and compared with every candidate's before the next chunk, so
several quantized candidates share one reference pass and no [positions, vocab] tensor is ever held whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from prismq.errors import PrismqError

DEFAULT_CHUNK = 256


class LogitSource:
    """A causal LM as trunk + head, so logits can be produced a chunk of positions at a time.

    On construction it checks, on a few tokens, that head(trunk(x)) is the model's own logits: a model that
    post-processes logits (softcapping, scaling) is refused rather than measured wrongly."""

    def __init__(self, model: nn.Module, name: str = "model",
                 cache: dict[bytes, torch.Tensor] | None = None) -> None:
        get_trunk, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
        trunk, head = (get_trunk() if get_trunk else None), (get_head() if get_head else None)
        if trunk is None or head is None:
            raise PrismqError(f"{name}: cannot find the decoder and output head of {type(model).__name__}")
        self.model, self.trunk, self.head, self.name, self.cache = model, trunk, head, name, cache
        self.device = next(model.parameters()).device
        self._check()

    @torch.no_grad()
    def _check(self) -> None:
        """Refuse a model whose logits are not head(last hidden state)."""
        tokens = torch.arange(8, device=self.device).remainder(self.head.weight.shape[0]).unsqueeze(0)
        whole = self.model(tokens, use_cache=False).logits.float()
        split = self.head(self._run_trunk(tokens[0]).unsqueeze(0)).float()
        if not torch.allclose(whole, split, rtol=0.02, atol=0.02 * float(whole.abs().amax()) + 1e-3):
            raise PrismqError(f"{self.name}: {type(self.model).__name__} transforms its logits after the output "
                              "head (softcapping or scaling?); the KL evaluator does not support it")

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [L, hidden] of one block of token ids [L], kept in `cache` (when given) by the
        block's token ids, so a model compared in several passes runs its trunk once per block."""
        if self.cache is None:
            return self._run_trunk(tokens)
        key = tokens.cpu().numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self._run_trunk(tokens)
        return self.cache[key]

    def _run_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trunk's final hidden states [L, hidden] for token ids [L]."""
        return self.trunk(input_ids=tokens.to(self.device).unsqueeze(0), use_cache=False).last_hidden_state[0]

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax over the full vocabulary of head(hidden): [c, hidden] -> [c, vocab]."""
        return torch.log_softmax(self.head(hidden).float(), dim=-1)


@dataclass
class BlockMeasure:
    """Per-position measurements of one candidate on one block (on the CPU): KL [L], top-1 agreement [L] (bool),
    next-token negative log-likelihood [L-1]."""

    kl: torch.Tensor
    same_top1: torch.Tensor
    nll: torch.Tensor


@torch.no_grad()
def compare_block(reference: LogitSource, candidates: Sequence[LogitSource], tokens: torch.Tensor,
                  chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, list[BlockMeasure]]:
    """Compare every candidate with the reference on one block of token ids [L].

    Returns the reference's next-token NLL [L-1] and one BlockMeasure per candidate. Per chunk of positions the
    reference log-probs are computed once and reused for all candidates; memory holds one [chunk, vocab] fp32
    tensor per model (plus the elementwise temporaries of one KL)."""
    if chunk_size < 1:
        raise PrismqError(f"chunk size must be positive, got {chunk_size}")
    length = tokens.numel()
    ref_hidden = reference.hidden(tokens)
    cand_hidden = [candidate.hidden(tokens) for candidate in candidates]
    targets = tokens.to(reference.device)
    ref_nll, kls, tops, nlls = [], [[] for _ in candidates], [[] for _ in candidates], [[] for _ in candidates]
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        next_ids = targets[start + 1: stop + 1]  # the positions that have a next token within the block
        ref_lp = reference.log_probs(ref_hidden[start:stop])
        ref_top = ref_lp.argmax(dim=-1)
        ref_p = ref_lp.exp()
        ref_nll.append(-ref_lp[: next_ids.numel()].gather(1, next_ids[:, None])[:, 0].cpu())
        for i, (candidate, hidden) in enumerate(zip(candidates, cand_hidden)):
            lp = candidate.log_probs(hidden[start:stop]).to(ref_lp.device)
            tops[i].append((lp.argmax(dim=-1) == ref_top).cpu())
            nlls[i].append(-lp[: next_ids.numel()].gather(1, next_ids[:, None])[:, 0].cpu())
            # sum_v p_ref * (log p_ref - log p_quant), the difference taken first (no cancellation), in place
            kls[i].append(torch.sub(ref_lp, lp, out=lp).mul_(ref_p).sum(-1).cpu())
            del lp
    measures = [BlockMeasure(torch.cat(k), torch.cat(t), torch.cat(n)) for k, t, n in zip(kls, tops, nlls)]
    return torch.cat(ref_nll), measures


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor, linear interpolation between order statistics (numpy's default), in
    float64; works at any size (torch.quantile refuses inputs over 16M elements)."""
    ordered = values.double().flatten().sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@dataclass(frozen=True)
class KLResult:
    """KL statistics of one quantized model against its reference (llama.cpp's set, DESIGN.md §6).

    KL values are nats per position, over every position of every block; perplexities are exp(mean next-token
    NLL) over positions 0..L-2 of each block. `kl` keeps the per-position values [N, L] for further analysis."""

    mean_kl: float
    median_kl: float
    p99_kl: float
    p999_kl: float
    max_kl: float
    same_top1: float
    ppl_ref: float
    ppl_quant: float
    ppl_ratio: float
    tokens: int
    blocks: int
    seqlen: int
    kl: torch.Tensor = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict (keys of DESIGN.md §1b plus ppl_ratio, blocks, seqlen)."""
        return {key: getattr(self, key) for key in ("mean_kl", "median_kl", "p99_kl", "p999_kl", "max_kl",
                                                     "same_top1", "ppl_ref", "ppl_quant", "ppl_ratio", "tokens",
                                                     "blocks", "seqlen")}

    def summary(self) -> str:
        """A few readable lines for the terminal."""
        return "\n".join([
            f"positions   {self.tokens} ({self.blocks} blocks x {self.seqlen} tokens)",
            f"KL (nats)   mean {self.mean_kl:.6f}  median {self.median_kl:.6f}  p99 {self.p99_kl:.6f}  "
            f"p99.9 {self.p999_kl:.6f}  max {self.max_kl:.6f}",
            f"same top-1  {100 * self.same_top1:.2f} %",
            f"perplexity  reference {self.ppl_ref:.4f}  quantized {self.ppl_quant:.4f}  ratio {self.ppl_ratio:.5f}",
        ])


def kl_result(kl: torch.Tensor, same_top1: torch.Tensor, nll_ref: torch.Tensor, nll_quant: torch.Tensor) -> KLResult:
    """Statistics from per-position values: kl and same_top1 [N, L], next-token NLLs [N, L-1] (any floats)."""
    if kl.ndim != 2 or kl.numel() == 0:
        raise PrismqError(f"need per-position KL values of shape [blocks, seqlen], got {tuple(kl.shape)}")
    ppl_ref = float(torch.exp(nll_ref.double().mean())) if nll_ref.numel() else float("nan")
    ppl_quant = float(torch.exp(nll_quant.double().mean())) if nll_quant.numel() else float("nan")
    values = kl.double()
    return KLResult(
        mean_kl=float(values.mean()), median_kl=quantile(values, 0.5), p99_kl=quantile(values, 0.99),
        p999_kl=quantile(values, 0.999), max_kl=float(values.max()), same_top1=float(same_top1.double().mean()),
        ppl_ref=ppl_ref, ppl_quant=ppl_quant, ppl_ratio=ppl_quant / ppl_ref, tokens=kl.numel(),
        blocks=kl.shape[0], seqlen=kl.shape[1], kl=kl.float(),
    )


def evaluate_candidates(reference: nn.Module, candidates: Sequence[nn.Module], blocks: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK, progress: bool = True,
                        reference_cache: dict[bytes, torch.Tensor] | None = None) -> list[KLResult]:
    """KL statistics of each candidate against the reference on token blocks [N, L], one reference pass.

    Blocks run one at a time (batch 1); per block the reference trunk runs once and its log-probs, chunk by
    chunk, serve every candidate. Results come back in the order of `candidates`. `reference_cache` (a dict the
    caller keeps) holds the reference's final hidden states per block across calls, so evaluating more candidates
    later on the same blocks does not rerun the reference trunk."""
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise PrismqError(f"need token blocks of shape [N >= 1, L >= 2], got {tuple(blocks.shape)}")
    ref = LogitSource(reference, "reference", reference_cache)
    sources = [LogitSource(model, f"candidate {i}") for i, model in enumerate(candidates)]
    return evaluate_states(ref, sources, blocks, chunk_size, progress)


class HiddenStates:
    """A model's final hidden states, already computed per block (a streamed walk's), behind the interface
    `compare_block` reads: `hidden(tokens)`, `log_probs(hidden)` through the given output head, `device`."""

    def __init__(self, head: nn.Module, blocks: torch.Tensor, hidden: Sequence[torch.Tensor]) -> None:
        if len(blocks) != len(hidden):
            raise PrismqError(f"{len(hidden)} hidden states for {len(blocks)} blocks")
        self.head, self.device = head, head.weight.device
        self.by_block = {block.cpu().numpy().tobytes(): h for block, h in zip(blocks, hidden)}

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The stored final hidden states [L, hidden] of block `tokens`, on the head's device."""
        return self.by_block[tokens.cpu().numpy().tobytes()].to(self.device)

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax over the full vocabulary of head(hidden): [c, hidden] -> [c, vocab]."""
        return torch.log_softmax(self.head(hidden).float(), dim=-1)


def evaluate_states(reference: Any, candidates: Sequence[Any], blocks: torch.Tensor,
                    chunk_size: int = DEFAULT_CHUNK, progress: bool = True) -> list[KLResult]:
    """KL statistics of each candidate against the reference, block by block (see compare_block). Each is a
    LogitSource (a model in memory) or HiddenStates (final hidden states from a streamed walk and its head)."""
    ref_nll, per_block = [], []
    for block in tqdm(blocks, desc="KL eval", unit="block", disable=not progress):
        nll, measures = compare_block(reference, candidates, block, chunk_size)
        ref_nll.append(nll)
        per_block.append(measures)
    nll_ref = torch.stack(ref_nll)
    return [kl_result(torch.stack([m[i].kl for m in per_block]), torch.stack([m[i].same_top1 for m in per_block]),
                      nll_ref, torch.stack([m[i].nll for m in per_block])) for i in range(len(candidates))]


def evaluate_kl(reference: nn.Module, quantized: nn.Module, blocks: torch.Tensor,
                chunk_size: int = DEFAULT_CHUNK, progress: bool = True) -> KLResult:
    """KL statistics of one quantized model against its reference on token blocks [N, L] (see evaluate_candidates)."""
    return evaluate_candidates(reference, [quantized], blocks, chunk_size, progress)[0]

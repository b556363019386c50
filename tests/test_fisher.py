"""The Fisher probe against a brute-force per-token Fisher, and the probe stage's resume / stale / corrupt handling."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from prismq.errors import PrismqError
from prismq.measure import fisher
from prismq.measure.fisher import probe, sample_positions
from prismq.artifacts import read_tensors
from prismq.measure.probe_stage import PROBE_KIND, run_probe

# float32 model; the probe sums each block in fp32 and the brute force is float64 throughout, so they agree to
# float32 rounding (measured: max relative difference ~1e-7 on fisher_out, ~1e-7 on the trace).
RTOL = 1e-5


def tiny_model() -> nn.Module:
    """A 2-layer float32 Llama small enough for a materialized [out, in] brute force."""
    return build_tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=128).float()


def linear_names(model: nn.Module) -> list[str]:
    """Every Linear but lm_head, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def brute_force(model: nn.Module, blocks: torch.Tensor, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Float64 reference: per position t the weight-gradient term G_t = dy_t x_t^T is materialized [out, in];
    per_token = (1/T) sum_t G_t^2, summed_sq = (1/T) sum_blocks (sum_t G_t)^2 (the wrong, squared-after-summing
    Fisher). dy comes from torch.autograd.grad of the summed NLL w.r.t. each retained Linear output."""
    modules = dict(model.named_modules())
    ref = {n: {"per_token": 0.0, "summed_sq": 0.0, "x_sq": 0.0, "x_absmax": torch.tensor(0.0)} for n in names}
    total = blocks.numel()
    for block in blocks:
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(_m: nn.Module, args: tuple, output: torch.Tensor) -> None:
                inputs[name], outputs[name] = args[0][0].detach().double(), output
            return hook

        handles = [modules[n].register_forward_hook(keep(n)) for n in names]
        embeds = model.get_input_embeddings()(block[None])
        logits = model(inputs_embeds=embeds).logits
        loss = nn.functional.cross_entropy(logits[0, :-1].double(), block[1:], reduction="sum")
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        for handle in handles:
            handle.remove()
        for name, dy in zip(names, grads):
            x = inputs[name]
            terms = dy[0].double()[:, :, None] * x[:, None, :]  # [T, out, in]: G_t
            ref[name]["per_token"] = ref[name]["per_token"] + terms.square().sum(0) / total
            ref[name]["summed_sq"] = ref[name]["summed_sq"] + terms.sum(0).square() / total
            ref[name]["x_sq"] = ref[name]["x_sq"] + x.square().sum(0) / total
            ref[name]["x_absmax"] = torch.maximum(ref[name]["x_absmax"], x.abs().max().float())
    return ref


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max absolute difference relative to the largest reference magnitude."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def test_probe_equals_brute_force_per_token_fisher() -> None:
    model = tiny_model()
    names = linear_names(model)
    blocks = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    got = probe(model, blocks, names, sample_rows=8, progress=False)
    ref = brute_force(model, blocks, names)
    worst = 0.0
    for name in names:
        fisher_matrix = ref[name]["per_token"]
        worst = max(worst, relative(got[f"{name}.fisher_out"], fisher_matrix.sum(1)))
        assert got[f"{name}.fisher_trace"].item() == pytest.approx(fisher_matrix.sum().item(), rel=RTOL)
        assert relative(got[f"{name}.x_sq"], ref[name]["x_sq"]) < RTOL
        assert got[f"{name}.x_absmax"].item() == pytest.approx(ref[name]["x_absmax"].item(), rel=1e-6)
        assert got[f"{name}.fisher_out"].dtype == torch.float32 and got[f"{name}.x_sq"].dtype == torch.float32
    assert worst < RTOL
    logits = model(blocks).logits
    want_loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
    assert got["loss"].item() == pytest.approx(want_loss.item(), rel=1e-5)


def test_probe_squares_per_token_not_after_summing() -> None:
    """A block of one repeated token makes every position's gradient nearly parallel, so squaring the summed
    gradient inflates the Fisher by up to the block length; the probe must give the per-token value."""
    model = tiny_model()
    names = linear_names(model)
    blocks = torch.full((2, 32), 7)
    blocks[1] = 11
    got = probe(model, blocks, names, sample_rows=4, progress=False)
    ref = brute_force(model, blocks, names)
    ratios = []
    for name in names:
        per_token, summed_sq = ref[name]["per_token"].sum(), ref[name]["summed_sq"].sum()
        ratios.append(float(summed_sq / per_token))
        assert got[f"{name}.fisher_trace"].item() == pytest.approx(per_token.item(), rel=RTOL)
    assert sorted(ratios)[len(ratios) // 2] > 5.0, ratios  # the definitions really differ here (up to L-1 = 31x)


def test_probe_leaves_no_grad_and_the_model_unchanged() -> None:
    model = build_tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=128)  # bf16, as run_probe loads
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = probe(model, torch.randint(0, 128, (2, 8)), linear_names(model), sample_rows=4, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert all(torch.isfinite(t).all() for t in got.values())
    assert got["model.layers.0.mlp.down_proj.x_sample"].dtype == torch.bfloat16
    assert all(not h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_x_sample_is_a_seeded_uniform_sample_of_real_input_rows() -> None:
    model = tiny_model()
    name = "model.layers.1.mlp.down_proj"
    blocks = torch.randint(0, 128, (6, 8), generator=torch.Generator().manual_seed(1))
    rows: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_pre_hook(
        lambda _m, args: rows.append(args[0][0].detach().clone()))
    with torch.no_grad():
        for block in blocks:
            model(block[None])
    handle.remove()
    every_row = torch.cat(rows)  # [N*L, in], position order
    sample = probe(model, blocks, [name], sample_rows=12, seed=3, progress=False)[f"{name}.x_sample"]
    distance = torch.cdist(sample.double(), every_row.double())
    nearest = distance.argmin(1)
    assert distance.min(1).values.max() < 1e-5 * every_row.abs().max()  # each sampled row is an actual input row
    assert torch.equal(nearest, sample_positions(blocks.numel(), 12, 3))  # at the positions the seed drew
    assert nearest.unique().numel() == 12 and len(set((nearest // 8).tolist())) >= 4  # across blocks, no repeats
    again = probe(model, blocks, [name], sample_rows=12, seed=3, progress=False)[f"{name}.x_sample"]
    other = probe(model, blocks, [name], sample_rows=12, seed=4, progress=False)[f"{name}.x_sample"]
    assert torch.equal(sample, again) and not torch.equal(sample, other)


def test_sample_positions_are_uniform_over_all_positions() -> None:
    draws = torch.stack([sample_positions(1000, 50, seed) for seed in range(200)])
    assert all(d.unique().numel() == 50 for d in draws)
    counts = torch.bincount(draws.flatten() // 100, minlength=10).double()  # 10 equal bins of positions
    assert (counts / counts.mean() - 1).abs().max() < 0.15  # 1000 draws a bin: ~3% standard deviation
    assert sample_positions(10, 50, 0).tolist() == list(range(10))  # asks for more than there are: all of them


def test_probe_refuses_bad_input() -> None:
    model = tiny_model()
    with pytest.raises(PrismqError, match="not Linear"):
        probe(model, torch.zeros(1, 4, dtype=torch.long), ["model.norm"], progress=False)
    with pytest.raises(PrismqError, match="L >= 2"):
        probe(model, torch.zeros(4, dtype=torch.long), linear_names(model), progress=False)
    with pytest.raises(PrismqError, match="sample_rows"):
        probe(model, torch.zeros(1, 4, dtype=torch.long), linear_names(model), sample_rows=-1, progress=False)


class TwiceLM(nn.Module):
    """A toy LM whose one Linear runs twice per forward, which the per-token averages cannot account for."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, inputs_embeds: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.mix(self.mix(inputs_embeds))))


def test_probe_refuses_a_linear_that_runs_twice_per_forward() -> None:
    model = TwiceLM()
    with pytest.raises(PrismqError, match="mix ran 4 times over 2 blocks"):
        probe(model, torch.randint(0, 16, (2, 5)), ["mix"], progress=False)
    assert probe(model, torch.randint(0, 16, (2, 5)), ["head"], progress=False)["head.fisher_trace"] > 0


def test_run_probe_writes_resumes_and_refuses_stale_or_corrupt(tiny_llama_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    stem = run_probe(tiny_llama_dir, tmp_path, blocks, device="cpu", sample_rows=8, progress=False)
    tensors, meta = read_tensors(tmp_path / "probe", PROBE_KIND)
    assert stem == tmp_path / "probe" and meta["tokens"] == 32 and meta["blocks"] == 2 and meta["seqlen"] == 16
    assert meta["sample_rows"] == 8 and meta["seed"] == 0 and meta["dtype"] == "bfloat16" and meta["loss"] > 0
    assert len([k for k in tensors if k.endswith(".fisher_trace")]) == 14 and not any("lm_head" in k for k in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.x_sample"].shape == (8, 256)

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("probe recomputed although a matching artifact exists")

    monkeypatch.setattr(fisher, "probe", must_not_run)
    assert run_probe(tiny_llama_dir, tmp_path, blocks, device="cpu", sample_rows=8) == stem
    with pytest.raises(PrismqError, match="stale"):
        run_probe(tiny_llama_dir, tmp_path, blocks[:1], device="cpu", sample_rows=8)
    with pytest.raises(PrismqError, match="stale.*sample_rows"):
        run_probe(tiny_llama_dir, tmp_path, blocks, device="cpu", sample_rows=16)
    data = bytearray((tmp_path / "probe.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "probe.safetensors").write_bytes(bytes(data))
    with pytest.raises(PrismqError, match="probe.safetensors.*does not match its sidecar"):
        run_probe(tiny_llama_dir, tmp_path, blocks, device="cpu", sample_rows=8)

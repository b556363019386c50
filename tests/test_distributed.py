"""Stages divided among processes (torch.distributed, gloo on the CPU, two processes) give what one process gives,
bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from prismq.engine.distributed import Ranks
from prismq.measure.cost import measure_costs
from prismq.model.checkpoint import SourceTensors
from prismq.model.targets import model_targets
from test_cost import fake_probe

FORMATS = ["NVFP4", "MXFP8", "FP8", "BF16"]
BATCH = 1 << 17  # several batches per shape on the tiny model: both ranks get some
# the divided walks on the CPU, and on one GPU shared by both processes (gloo for the GPU's tensors too: NCCL takes
# one GPU per process), where one is present
DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])


def _costs(model_dir: Path, probe_path: Path) -> list[dict]:
    with ExitStack() as stack:
        rows = measure_costs(SourceTensors(model_dir, stack), load_file(probe_path), model_targets(model_dir), FORMATS,
                             torch.device("cpu"), progress=False, max_batch_elements=BATCH)
    return [asdict(row) for row in rows]


def _cost_rank(rank: int, world: int, rendezvous: str, model_dir: Path, probe_path: Path, out: Path) -> None:
    """One of `world` processes: joins the gloo group, prices its share, writes the rows it ends with."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        assert Ranks.current() == Ranks(rank, world)
        (out / f"rows-{rank}.json").write_text(json.dumps(_costs(model_dir, probe_path)))
    finally:
        dist.destroy_process_group()


def test_the_cost_stage_on_two_gloo_processes_prices_exactly_what_one_process_does(tiny_llama_dir: Path,
                                                                                     tmp_path: Path) -> None:
    fake_probe(tiny_llama_dir, tmp_path)
    probe_path = tmp_path / "probe.safetensors"
    alone = _costs(tiny_llama_dir, probe_path)
    assert Ranks.current() == Ranks(0, 1)  # no group in this process: one process does everything
    mp.spawn(_cost_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", tiny_llama_dir, probe_path, tmp_path),
             nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rows-{rank}.json").read_text()) == alone, rank


def test_work_is_dealt_round_robin_and_covers_every_piece_once() -> None:
    dealt = [[i for i in range(11) if Ranks(rank, 3).mine(i)] for rank in range(3)]
    assert dealt == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert Ranks(0, 1).gather({"a": 1}) == {"a": 1}


def test_unequal_pieces_are_dealt_so_the_ranks_finish_together() -> None:
    """One costly piece and five cheap ones: round-robin would load the ranks 7 and 3, the deal 5 and 5."""
    assert Ranks(1, 2).deal([1, 5, 1, 1, 1, 1]) == [1, 0, 1, 1, 1, 1]
    assert Ranks(0, 3).deal([2, 2, 2, 3]) == [1, 2, 1, 0]  # ties: to the lowest rank, the earliest piece first
    assert Ranks(0, 1).deal([3, 1]) == [0, 0]


def test_a_divided_walk_snapshots_nothing_and_its_leader_removes_a_one_process_walks_snapshot(tmp_path: Path) -> None:
    """Else a one-process rerun would resume from the old snapshot, past layers whose results the divided walk
    replaced (the rounding walk's store is rewritten from its first layer)."""
    from prismq.engine.walkstate import WalkState

    state = WalkState(tmp_path / "lanes.walk", {"model": "m"})
    state.save("lanes", {"hidden.0": torch.ones(2)}, layer=3)
    assert Ranks(0, 1).own(state) is state and state.exists("lanes")
    assert Ranks(1, 2).own(state) is None and state.exists("lanes")  # only the leader writes the work directory
    assert Ranks(0, 2).own(state) is None and not state.exists("lanes")


def _flips(rank: int, world: int, rendezvous: str, model_dir: Path, out: Path) -> None:
    """One of `world` processes (world 1: no group): measures the flips of test_select and three whole
    assignments, writes what it ends with."""
    from prismq.engine.stream import LayerStream
    from prismq.select.measured import measure_flips, measure_lanes
    from test_select import FLIPS, _assignment

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        base = _assignment()
        blocks = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(5))
        with LayerStream(model_dir, torch.float32) as stream:
            amax = {n: torch.tensor(2.5) for n in base}
            measured = measure_flips(stream, base, FLIPS, blocks, amax, progress=False)
            flipped = [{**base, **dict.fromkeys(f.unit, f.format)} for f in FLIPS[:2]]
            whole = measure_lanes(stream, [base, *flipped], blocks, amax, progress=False)
        result = {"base": measured.base.kl.tolist(), "flips": [[m.delta_kl, m.stderr, m.mean_kl, m.flip.format]
                                                                for m in measured.flips],
                  "lanes": [r.kl.tolist() for r in whole]}
        (out / f"flips-{world}-{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_flips_and_lanes_measured_on_two_gloo_processes_equal_one_process_measuring_them_all(tiny_llama_dir: Path,
                                                                                               tmp_path: Path) -> None:
    """L3's flips and the frontier's whole candidates divided among processes (each walks the base and its own
    lanes), gathered to every rank."""
    _flips(0, 1, "", tiny_llama_dir, tmp_path)
    mp.spawn(_flips, args=(2, f"file://{tmp_path / 'rendezvous'}", tiny_llama_dir, tmp_path), nprocs=2, join=True)
    alone = json.loads((tmp_path / "flips-1-0.json").read_text())
    assert len(alone["flips"]) == 4 and len(alone["lanes"]) == 3
    for rank in (0, 1):
        assert json.loads((tmp_path / f"flips-2-{rank}.json").read_text()) == alone, rank


def _probe(rank: int, world: int, rendezvous: str, model_dir: Path, out: Path, device: str) -> None:
    """One of `world` processes (world 1: no group): the streamed probe over 5 blocks, its statistics written."""
    from prismq.engine.stream import LayerStream
    from prismq.measure.fisher_streamed import probe_streamed

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        blocks = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(3))
        with LayerStream(model_dir, torch.float32, Ranks.current().device(torch.device(device))) as stream:
            names = [n for n in stream.targets if n != "lm_head"]
            # 5 blocks in batches of 2: ranks 0 and 1 get batches [0, 1] + [4] and [2, 3], as one process runs them
            probed = dict(probe_streamed(stream, blocks, names, sample_rows=16, progress=False, batch_blocks=2))
            # one batch of all 5: rank 1 has none and still joins every layer's merge
            whole = dict(probe_streamed(stream, blocks, names, sample_rows=16, progress=False, batch_blocks=8))
            assert whole.keys() == probed.keys()
            for key, value in probed.items():
                torch.testing.assert_close(whole[key], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
        save_file({k: v.cpu().contiguous() for k, v in probed.items()}, str(out / f"probe-{world}-{rank}.safetensors"))
    finally:
        if world > 1:
            dist.destroy_process_group()


@DEVICES
def test_the_probe_on_two_gloo_processes_gives_one_process_statistics(tiny_llama_dir: Path, tmp_path: Path,
                                                                      device: str) -> None:
    """Calibration blocks divided among processes, each layer's sums combined: the dense model's and a MoE's
    Fisher, input statistics and samples equal one process's (sums in another order: to rounding; samples, maxima
    and routed counts exactly)."""
    from test_layout import tiny_moe

    for number, model_dir in enumerate((tiny_llama_dir, tiny_moe("qwen3_moe", tmp_path / "moe"))):
        out = tmp_path / f"out-{number}"
        out.mkdir()
        _probe(0, 1, "", model_dir, out, device)
        mp.spawn(_probe, args=(2, f"file://{out / 'rendezvous'}", model_dir, out, device), nprocs=2, join=True)
        alone = load_file(out / "probe-1-0.safetensors")
        assert any(".experts." in k for k in alone) == (model_dir != tiny_llama_dir)
        for rank in (0, 1):
            divided = load_file(out / f"probe-2-{rank}.safetensors")
            assert divided.keys() == alone.keys()
            for key, value in alone.items():
                if key.endswith(("x_sample", "x_absmax", "x_token_max", "routed_tokens")):
                    assert torch.equal(divided[key], value), key
                else:
                    torch.testing.assert_close(divided[key], value, rtol=1e-6, atol=0, msg=key)


def test_quantize_on_two_processes_ships_what_one_process_ships(small_vocab_llama: Path, tmp_path: Path,
                                                                capfd) -> None:
    """`prismq quantize --gpus 2` (here two CPU processes on gloo): the probe's batches, the cost stage's batches,
    L2's re-probe and re-cost, L3's flips, the frontier's candidates, GPTQ's groups and the polish's and report's
    variants divided, rank 0 the only writer: the same selection and the same checkpoint, byte for byte, as one
    process."""
    from prismq.cli import main

    settings = ["--calib-blocks", "8", "--calib-seqlen", "32", "--heldout-blocks", "2", "--selection-blocks", "2",
                "--rounding", "gptq", "--select-units", "2", "--select-recost", "1", "--polish-units", "2",
                "--device", "cpu", "--compute-dtype", "fp32", "--target-bits", "5"]
    assert main(["quantize", str(small_vocab_llama), "--out", str(tmp_path / "one"), *settings]) == 0
    capfd.readouterr()
    leftover = tmp_path / "two.work" / ".probe-rank1-killed"  # what a killed run of several processes leaves
    leftover.mkdir(parents=True)
    (leftover / "input-0.safetensors").write_bytes(b"layer inputs")
    assert main(["quantize", str(small_vocab_llama), "--out", str(tmp_path / "two"), *settings, "--gpus", "2"]) == 0
    said = capfd.readouterr().out.splitlines()  # the leader's messages, once
    assert sum(line.startswith("prismq: serve it with") for line in said) == 1
    one, two = tmp_path / "one.work", tmp_path / "two.work"
    for name, key in (("selection.json", "selection"), ("rounding.json", "rounding"), ("polish.json", "polish")):
        alone, divided = (json.loads((work / name).read_text())[key] for work in (one, two))
        assert divided["assignment"] == alone["assignment"], name  # the surrogate's numbers: equal to rounding
    assert json.loads((two / "eval.json").read_text())["mean_kl"] == json.loads((one / "eval.json").read_text())[
        "mean_kl"]
    shipped = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert shipped and shipped == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    for name in shipped:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not list(tmp_path.glob("two.work/*rank*"))  # no per-rank leftovers, an old one removed
    # the same under torchrun's two processes (it sets RANK and WORLD_SIZE; --gpus is left at 1)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "prismq.cli", "quantize", str(small_vocab_llama), "--out", str(tmp_path / "torchrun"), *settings],
                   check=True, capture_output=True)
    for name in shipped:
        assert (tmp_path / "torchrun" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert [json.loads((tmp_path / f"{run}.work" / "summary.json").read_text())["processes"]
            for run in ("one", "two", "torchrun")] == [1, 2, 2]


def test_an_error_on_several_processes_is_one_line(small_vocab_llama: Path, tmp_path: Path, capsys) -> None:
    """An error the leader raises while the others wait stops every process and says why in one line, as one
    process would; the existing output is left as it was."""
    from prismq.cli import EXIT_ERROR, main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    argv = ["quantize", str(small_vocab_llama), "--out", str(tmp_path / "out"), "--target-bits", "5",
            "--calib-blocks", "4", "--calib-seqlen", "32", "--device", "cpu"]
    assert main(argv) == EXIT_ERROR
    alone = capsys.readouterr().err.strip().splitlines()[-1]
    assert alone.startswith("prismq: error: ")
    for _ in range(3):  # the leader's message, whichever process the launcher hears of first
        assert main([*argv, "--gpus", "2"]) == EXIT_ERROR
        assert capsys.readouterr().err.strip().splitlines()[-1] == alone
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@contextmanager
def _joined_counting_gptq(rank: int, world: int, rendezvous: str) -> Iterator[list[int]]:
    """Inside: one of `world` processes of a gloo group (world 1: no group), its GPTQ passes counted (one entry
    each in the list yielded)."""
    from prismq.rounding import sequential

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    gptq, calls = sequential.gptq_siblings, []
    sequential.gptq_siblings = lambda *args, **kwargs: calls.append(1) or gptq(*args, **kwargs)
    try:
        yield calls
    finally:
        sequential.gptq_siblings = gptq
        if world > 1:
            dist.destroy_process_group()


def _save_bits(tensors: Mapping[str, Mapping[str, torch.Tensor]], path: Path) -> None:
    """Shipped tensors (name -> suffix -> tensor) in a safetensors file, one-byte dtypes as their bytes."""
    save_file({f"{name}::{suffix}": (t.view(torch.uint8) if t.dtype.itemsize == 1 else t).cpu().contiguous()
               for name, parts in tensors.items() for suffix, t in parts.items()}, str(path))


def _rounding(rank: int, world: int, rendezvous: str, model_dir: Path, out: Path, device: str) -> None:
    """One of `world` processes (world 1: no group): the rounding walk of a gptq+sweep lane with method and format
    variants; the leader writes every tensor it keeps, each rank the details and KLs it ends with."""
    from prismq.engine.stream import LayerStream
    from prismq.model.siblings import sibling_groups
    from prismq.rounding.lanes import round_lanes

    with _joined_counting_gptq(rank, world, rendezvous) as calls:
        g = torch.Generator().manual_seed(5)
        calibration, heldout = torch.randint(0, 256, (4, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)
        with LayerStream(model_dir, torch.float32, Ranks.current().device(torch.device(device))) as stream:
            names = [n for n in stream.targets if n != "lm_head"]
            base = dict.fromkeys(names, "NVFP4")
            upgraded = {**base, **{n: "MXFP8" for group in sibling_groups(base)[1::3] for n in group}}
            amax = {n: torch.tensor(3.0) for n in names}
            walk = round_lanes(stream, [(base, "gptq+sweep")], calibration, heldout, amax, progress=False,
                               variants=[(0, base, "gptq"), (0, upgraded), (0, upgraded, "rtn")],
                               ranks=Ranks.current())
        if rank == 0:
            _save_bits({f"{number}/{name}": tensors for number, rounded in enumerate(walk.rounded)
                        for name, tensors in rounded.encoded.items()}, out / f"rounded-{world}.safetensors")
        (out / f"rounding-{world}-{rank}.json").write_text(json.dumps(
            {"kl": [r.kl.tolist() for r in walk.kl], "details": [list(r.details.items()) for r in walk.rounded]
             if rank == 0 else [], "names": [list(r.encoded) for r in walk.rounded], "gptq_calls": len(calls)}))


@DEVICES
def test_the_rounding_walk_on_two_gloo_processes_ships_and_measures_what_one_process_does(tiny_llama_dir: Path,
                                                                                         tmp_path: Path,
                                                                                         device: str) -> None:
    """Each layer's groups (dense Linears, routed and shared experts) dealt to two processes, GPTQ'd with their
    method and format variants on each rank's share, gathered: the leader keeps the same tensors bit for bit, the
    same GPTQ details in the same order, and every rank measures the same held-out KL as one process rounding
    everything."""
    from test_layout import tiny_moe

    for number, model_dir in enumerate((tiny_llama_dir, tiny_moe("qwen2_moe", tmp_path / "moe"))):
        out = tmp_path / f"out-{number}"
        out.mkdir()
        _rounding(0, 1, "", model_dir, out, device)
        mp.spawn(_rounding, args=(2, f"file://{out / 'rendezvous'}", model_dir, out, device), nprocs=2, join=True)
        alone, divided = load_file(out / "rounded-1.safetensors"), load_file(out / "rounded-2.safetensors")
        assert any(".experts." in k for k in alone) == (number == 1)
        assert divided.keys() == alone.keys() and len(alone) > 20
        assert all(torch.equal(divided[k], value) for k, value in alone.items())
        one, leader, follower = (json.loads((out / f"rounding-{run}.json").read_text())
                                 for run in ("1-0", "2-0", "2-1"))
        assert len(one["kl"]) == 4 and len(one["details"][0]) > 4
        assert any(".shared_expert." in name for name in one["names"][0]) == (number == 1)
        calls = one.pop("gptq_calls"), leader.pop("gptq_calls"), follower.pop("gptq_calls")
        assert calls[1] + calls[2] == calls[0] and min(calls) > 0  # the GPTQ work divided, none done twice
        assert leader == one
        assert follower["kl"] == one["kl"] and follower["names"] == one["names"]


def _variants(rank: int, world: int, rendezvous: str, model_dir: Path, out: Path, device: str) -> None:
    """One of `world` processes (world 1: no group): the polish's two walks over variants of a gptq+sweep base, the
    leader handing them out (`run_everywhere`, the others in `serve`); the second walk reuses the first's tensors.
    The leader writes the KLs and the store; every rank how many GPTQ passes it ran."""
    from prismq.engine.distributed import run_everywhere, serve, stop_serving
    from prismq.engine.stream import LayerStream
    from prismq.engine.walkstate import WalkState
    from prismq.rounding.gptq import GPTQSettings
    from prismq.rounding.lanes import round_lanes
    from prismq.rounding.store import EncodedStore
    from prismq.select.shipped import variants_walk
    from test_select import _assignment

    with _joined_counting_gptq(rank, world, rendezvous) as calls:
        if rank > 0:
            serve()
        else:
            base, settings = _assignment(), GPTQSettings()
            amax = {n: torch.tensor(2.5) for n in base}
            g = torch.Generator().manual_seed(6)
            calibration, blocks = (torch.randint(0, 512, (n, 16), generator=g) for n in (4, 2))
            with LayerStream(model_dir, torch.float32, device) as stream:
                lanes = round_lanes(stream, [(base, "gptq+sweep")], calibration, blocks, amax, settings,
                                    spill_dir=out / f"lanes-{world}", progress=False)
            calls.clear()
            store = EncodedStore(out / f"variants-{world}")
            walk = dict(model_dir=model_dir, dtype=torch.float32, device=device, max_memory=None, base=base,
                        base_tensors=lanes.rounded[0].encoded, blocks=blocks, calibration=calibration,
                        method="gptq+sweep", input_amax=amax, settings=settings, store=store)
            flips = [dict.fromkeys((f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")), "MXFP8") for i in (0, 1)]
            flips += [{"model.layers.0.self_attn.o_proj": "MXFP8"}, {"model.layers.1.mlp.down_proj": "BF16"},
                      {"model.layers.1.self_attn.o_proj": "NVFP4"}]
            first = run_everywhere(variants_walk, **walk, variants=flips, state=WalkState(out / f"a-{world}", {}))
            moves = [{**flips[0], **flips[2]}, {**flips[1], "model.layers.0.mlp.down_proj": "MXFP8"}]
            second = run_everywhere(variants_walk, **walk, variants=moves, state=WalkState(out / f"b-{world}", {}))
            stop_serving()
            _save_bits(store, out / f"variants-{world}.safetensors")
            (out / f"variants-{world}.json").write_text(json.dumps([r.kl.tolist() for r in first.kl + second.kl]))
        (out / f"calls-{world}-{rank}.json").write_text(json.dumps(len(calls)))


@DEVICES
def test_variants_measured_as_shipped_on_two_gloo_processes_equal_one_process(tiny_llama_dir: Path, tmp_path: Path,
                                                                              device: str) -> None:
    """The polish's and the report's walks (`variants_walk`) divided: each rank measures its share of the variants
    and rounds its share of their changed units; the leader's store and every KL equal one process's, and a
    second walk reads the first one's tensors from the leader's store instead of rounding them again."""
    _variants(0, 1, "", tiny_llama_dir, tmp_path, device)
    mp.spawn(_variants, args=(2, f"file://{tmp_path / 'rendezvous'}", tiny_llama_dir, tmp_path, device), nprocs=2,
             join=True)
    one, two = (json.loads((tmp_path / f"variants-{world}.json").read_text()) for world in (1, 2))
    assert len(one) == 5 + 1 + 2 + 1 and one == two
    alone, divided = (load_file(tmp_path / f"variants-{world}.safetensors") for world in (1, 2))
    assert alone.keys() == divided.keys() and len(alone) >= 8
    assert all(torch.equal(divided[k], v) for k, v in alone.items())
    calls = [json.loads((tmp_path / f"calls-{run}.json").read_text()) for run in ("1-0", "2-0", "2-1")]
    assert calls[1] + calls[2] == calls[0] and min(calls) > 0

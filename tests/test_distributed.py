"""Stages divided among processes (torch.distributed, gloo on the CPU, two processes) give what one process gives,
bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from prismq.engine.distributed import Ranks
from prismq.measure.cost import measure_costs
from prismq.model.checkpoint import SourceTensors
from prismq.model.targets import model_targets
from test_cost import fake_probe

FORMATS = ["NVFP4", "MXFP8", "FP8", "BF16"]
BATCH = 1 << 17  # several batches per shape on the tiny model: both ranks get some


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


def _probe(rank: int, world: int, rendezvous: str, model_dir: Path, out: Path) -> None:
    """One of `world` processes (world 1: no group): the streamed probe over 5 blocks, its statistics written."""
    from safetensors.torch import save_file

    from prismq.engine.stream import LayerStream
    from prismq.measure.fisher_streamed import probe_streamed

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        blocks = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(3))
        with LayerStream(model_dir, torch.float32) as stream:
            names = [n for n in stream.targets if n != "lm_head"]
            # 5 blocks in batches of 2: ranks 0 and 1 get batches [0, 1] + [4] and [2, 3], as one process runs them
            probed = dict(probe_streamed(stream, blocks, names, sample_rows=16, progress=False, batch_blocks=2))
            # one batch of all 5: rank 1 has none and still joins every layer's merge
            whole = dict(probe_streamed(stream, blocks, names, sample_rows=16, progress=False, batch_blocks=8))
            assert whole.keys() == probed.keys()
            for key, value in probed.items():
                torch.testing.assert_close(whole[key], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
        save_file({k: v.contiguous() for k, v in probed.items()}, str(out / f"probe-{world}-{rank}.safetensors"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_the_probe_on_two_gloo_processes_gives_one_process_statistics(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Calibration blocks divided among processes, each layer's sums combined: the dense model's and a MoE's
    Fisher, input statistics and samples equal one process's (sums in another order: to rounding; samples, maxima
    and routed counts exactly)."""
    from test_layout import tiny_moe

    for number, model_dir in enumerate((tiny_llama_dir, tiny_moe("qwen3_moe", tmp_path / "moe"))):
        out = tmp_path / f"out-{number}"
        out.mkdir()
        _probe(0, 1, "", model_dir, out)
        mp.spawn(_probe, args=(2, f"file://{out / 'rendezvous'}", model_dir, out), nprocs=2, join=True)
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
    L2's re-probe and re-cost, L3's flips and the frontier's candidates divided, rank 0 the only writer: the same
    selection and the same checkpoint, byte for byte, as one process."""
    from prismq.cli import main

    settings = ["--calib-blocks", "8", "--calib-seqlen", "32", "--heldout-blocks", "2", "--selection-blocks", "2",
                "--rounding", "rtn", "--select-units", "2", "--select-recost", "1", "--polish-units", "2",
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

"""The polish stage: the round stage's shipped result in, the polished result out (`polish.polish`).

Every measurement is a walk of `shipped.measure_variants` on the selection split: the current mix as the round stage
ships it (its tensors), each variant's changed units rounded as they would ship. The tensors of a round's flips go to
WORK/polish/round-N/ and each walk saves where it stands in WORK/polish/*.walk, so a killed run resumes there. When
a move was kept, WORK/rounded/polished is the store the export reads: the moved units' tensors, and an index into the
round stage's files for the rest. Writes WORK/polish.json (every round's flips, moves, KL, the move kept); rerunning
with the same rounding, text and settings reuses it. `--polish-units 0`, `--selection surrogate` and `--uniform`
skip it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from prismq.allocate.stage import allocation_budget, allocation_problem
from prismq.artifacts import fingerprint_model, fingerprint_tokens, read_current, write_json
from prismq.config import QuantizeConfig
from prismq.engine.distributed import run_everywhere
from prismq.engine.walkstate import WalkState
from prismq.formats import Tensors
from prismq.measure.cost import CostRow
from prismq.measure.kl import KLResult
from prismq.model.source import resolve_device
from prismq.rounding.gptq import GPTQSettings
from prismq.rounding.ranges import ranges_for
from prismq.rounding.stage import Rounding
from prismq.rounding.store import EncodedStore
from prismq.select.polish import polish
from prismq.select.shipped import VARIANTS, Overlay, variants_walk

logger = logging.getLogger(__name__)

POLISH = "polish"


class Polish(BaseModel):
    """What the polish did: the assignment and store that ship, the selection-split KL before and after, every
    round's measurements, why it stopped."""

    mode: str  # "polished" or "skipped"
    assignment: dict[str, str]
    store: str
    start_kl: float | None = None
    final_kl: float | None = None
    rounds: list[dict[str, Any]] = []
    stopped: str = ""

    def shipped(self, rounding: Rounding, input_amax: dict[str, torch.Tensor]) -> Rounding:
        """The round stage's result with the polished assignment and tensors (what the export writes)."""
        if self.assignment == rounding.assignment:
            return rounding
        ranges = ranges_for(input_amax, [self.assignment])
        return rounding.model_copy(update={"assignment": self.assignment, "store": self.store,
                                           "input_amax": {n: float(v) for n, v in ranges.items()}})


class _AsShipped:
    """The polish's evaluator: variants of the current mix measured with the tensors they would ship."""

    def __init__(self, work: Path, config: QuantizeConfig, model_dir: Path, rounding: Rounding, dtype: torch.dtype,
                 device: str, blocks: torch.Tensor, calibration: torch.Tensor, input_amax: dict[str, torch.Tensor],
                 expect: dict[str, Any]) -> None:
        self.work, self.config, self.model_dir, self.dtype, self.device = work, config, model_dir, dtype, device
        self.blocks, self.calibration, self.input_amax, self.expect = blocks, calibration, input_amax, expect
        self.method = rounding.chosen
        self.settings = GPTQSettings(config.gptq_block_size, config.gptq_act_order, tuple(config.gptq_damping))
        self.assignment = dict(rounding.assignment)
        self.base_store = EncodedStore.reopen(Path(rounding.store))
        self.tensors: Mapping[str, Tensors] = self.base_store
        self.store: EncodedStore | None = None

    def measure(self, step: str, variants: list[dict[str, str]]) -> list[KLResult]:
        round_name = step.rsplit("-", 1)[0]
        state = WalkState(self.work / POLISH / f"{step}.walk", self.expect)
        if step.endswith("-flips"):  # a round's first walk: its store starts empty unless the walk is resumed
            self.store = EncodedStore(self.work / POLISH / round_name, fresh=not state.exists(VARIANTS))
        assert self.store is not None
        ranges = ranges_for(self.input_amax, [self.assignment, *({**self.assignment, **v} for v in variants)])
        return run_everywhere(variants_walk, model_dir=self.model_dir, dtype=self.dtype, device=self.device,
                              max_memory=self.config.max_memory_bytes, base=self.assignment, base_tensors=self.tensors,
                              variants=variants, blocks=self.blocks,
                              calibration=self.calibration if self.method != "rtn" else None, method=self.method,
                              input_amax=ranges, settings=self.settings, store=self.store, state=state).kl

    def accept(self, changes: dict[str, str]) -> None:
        assert self.store is not None
        self.tensors = Overlay(self.tensors, self.store, changes)
        self.assignment.update(changes)


def stage_polish(work: Path, config: QuantizeConfig, model_dir: Path, rows: list[CostRow], rounding: Rounding,
                 dtype: torch.dtype, device: str, blocks: torch.Tensor, calibration: torch.Tensor,
                 input_amax: dict[str, torch.Tensor]) -> Polish:
    """Run (or resume) the polish (see the module docstring) from what the round stage ships; `blocks`: the
    selection split, `calibration`: the blocks the round stage rounded on, `input_amax`: the ranges stage's."""
    problem = allocation_problem(config, model_dir, rows)
    budget = allocation_budget(config, model_dir, problem) if not config.uniform else 0
    expect = {"rounding": hashlib.sha256((work / "rounding.json").read_bytes()).hexdigest()[:16],
              "settings": {"polish_units": config.polish_units, "polish_rounds": config.polish_rounds,
                           "polish_margin": config.polish_margin,
                           "selection": config.selection, "budget": budget, "formats": problem.formats,
                           "force": config.force},
              "text": fingerprint_tokens(blocks), "calibration": fingerprint_tokens(calibration),
              "dtype": str(dtype).removeprefix("torch.")}
    done = read_current(work / "polish.json", POLISH, expect)
    if done is not None:
        return Polish.model_validate(done["polish"])
    if config.uniform or config.selection == "surrogate" or not config.polish_units or not config.polish_rounds:
        result = Polish(mode="skipped", assignment=rounding.assignment, store=rounding.store)
    else:
        evaluator = _AsShipped(work, config, model_dir, rounding, dtype, device, blocks, calibration, input_amax,
                               {**expect, "model": fingerprint_model(model_dir),
                                "device": resolve_device(device).type})
        assignment, log = polish(problem, rounding.assignment, budget, config.polish_units, config.polish_rounds,
                                 evaluator, config.polish_margin)
        store = rounding.store
        if assignment != rounding.assignment:
            changed = {n for n in assignment if assignment[n] != rounding.assignment[n]}
            store = str(work / "rounded" / "polished")
            EncodedStore.overlay(Path(store), evaluator.base_store, {n: evaluator.tensors[n] for n in changed})
        logger.info("polish: %d move(s) kept, selection-split mean KL %.5f -> %.5f (%s)",
                    sum(r["kept"] is not None for r in log.rounds), log.start_kl or 0.0, log.final_kl or 0.0,
                    log.stopped)
        result = Polish(mode="polished", assignment=assignment, store=store, start_kl=log.start_kl,
                        final_kl=log.final_kl, rounds=log.rounds, stopped=log.stopped)
    write_json(work / "polish.json", POLISH, {**expect, "polish": result.model_dump()})
    shutil.rmtree(work / POLISH, ignore_errors=True)  # the walks and the rounds' stores (moved units are copied)
    return result

"""Calibrated input ranges: the absolute maximum each Linear sees, for static input scales (NVFP4 W4A4)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def input_absmax(model: nn.Module, blocks: torch.Tensor, names: list[str], progress: bool = True) -> dict[str, torch.Tensor]:
    """Max |x| over every input element of each named Linear across the calibration blocks (one block a batch)."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    amax = {name: torch.zeros((), dtype=torch.float32, device=device) for name in names}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            torch.maximum(amax[name], args[0].detach().abs().amax().float(), out=amax[name])
        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    try:
        for block in tqdm(blocks, desc="calibrate input ranges", unit="block", disable=not progress):
            model(block.unsqueeze(0).to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.cpu() for name, value in amax.items()}

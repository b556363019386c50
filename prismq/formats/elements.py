"""Element and scale number formats: FP4/FP6 minifloats, FP8 E4M3, E8M0 exponents.

Every rounding here reproduces the arithmetic compressed-tensors uses (and therefore the bytes vLLM loads):
round-to-nearest-even onto the element grid, saturation at the largest magnitude, and the dtype in which each
intermediate is computed. The codecs in this package are the only callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class MiniFloat:
    """A sign + exponent + mantissa float of a few bits (E2M1, E2M3, E3M2) with no inf/nan encodings."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @cached_property
    def magnitudes(self) -> torch.Tensor:
        """All non-negative representable values in code order (code = magnitude index), float32."""
        codes = torch.arange(1 << (self.exp_bits + self.man_bits))
        exponent = codes >> self.man_bits
        mantissa = (codes & ((1 << self.man_bits) - 1)).float() / (1 << self.man_bits)
        normal = exponent > 0
        scale = torch.exp2(torch.where(normal, exponent, 1).float() - self.bias)
        return torch.where(normal, 1.0 + mantissa, mantissa) * scale

    @property
    def max(self) -> float:
        return float(self.magnitudes[-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, sign in the top bit) of x rounded to the nearest magnitude, ties to even, saturating.

        A negative input that rounds to zero keeps its sign bit (code -0), as compressed-tensors writes it; an
        input of -0.0 itself gets +0. With E the value's exponent (at least the subnormal one) and
        n = round(|x| / 2**(E - man_bits)), the magnitude code is (E - E_min) * 2**man_bits + n: a mantissa that
        rounds up to 2**(man_bits + 1) carries into the next exponent, and n's parity is the mantissa's."""
        magnitude = x.abs().float().clamp(max=self.max)
        min_exponent = 1 - self.bias
        exponent = ((magnitude.view(torch.int32) >> 23) - 127).clamp(min=min_exponent)
        inverse_quantum = ((127 + self.man_bits - exponent) << 23).view(torch.float32)  # exact power of two
        steps = torch.round(magnitude * inverse_quantum).to(torch.int32)
        index = ((exponent - min_exponent) << self.man_bits) + steps
        return index.to(torch.uint8) | ((x < 0).to(torch.uint8) << (self.exp_bits + self.man_bits))

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of codes (-0 decodes to 0)."""
        magnitude_bits = self.exp_bits + self.man_bits
        return _value_table(self, codes.device)[(codes & ((1 << (magnitude_bits + 1)) - 1)).long()]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded onto the grid (float32), bit for bit values(encode(x)) (a negative input that rounds to zero
        gives -0.0, as its code -0 decodes), computed on the values without codes or a table lookup: the magnitude
        rounded to a multiple of its exponent's quantum 2**(E - man_bits), ties to even."""
        magnitude = x.abs().float().clamp_(max=self.max)  # in place from here on: every large
        exponent = (magnitude.view(torch.int32) >> 23).sub_(127).clamp_(min=1 - self.bias)  # CPU allocation costs
        inverse_quantum = exponent.neg().add_(127 + self.man_bits).bitwise_left_shift_(23)  # a page-faulting pass
        quantum = exponent.add_(127 - self.man_bits).bitwise_left_shift_(23)
        rounded = magnitude.mul_(inverse_quantum.view(torch.float32)).round_().mul_(quantum.view(torch.float32))
        return rounded.copysign_(x + 0.0)  # x + 0.0 turns an input of -0.0 into +0.0, as its code +0 decodes


@lru_cache(maxsize=None)
def _value_table(element: MiniFloat, device: torch.device) -> torch.Tensor:
    """Signed values of every code of `element` on `device`, built once per device (GPTQ decodes one column at a
    time, and a host-to-device copy per call would stall the GPU)."""
    return torch.cat([element.magnitudes, -element.magnitudes]).to(device)


E2M1 = MiniFloat("E2M1", exp_bits=2, man_bits=1, bias=1)
E2M3 = MiniFloat("E2M3", exp_bits=2, man_bits=3, bias=1)
E3M2 = MiniFloat("E3M2", exp_bits=3, man_bits=2, bias=3)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast to float8_e4m3fn (torch's cast alone turns overflow into NaN)."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_EXPONENT_BITS = {torch.bfloat16: 8, torch.float16: 5, torch.float32: 8}
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def round_to_power_of_two(amax: torch.Tensor, element_mantissa_bits: int) -> torch.Tensor:
    """Round non-negative values to a power of two the way the MX reference does: keep the exponent,
    bumping it when the mantissa would round past the element format's largest mantissa. Same dtype out."""
    dtype = amax.dtype
    if dtype not in _MANTISSA_BITS:
        raise TypeError(f"MX scales need a bf16, fp16 or fp32 tensor, got {dtype}")
    mantissa_bits = _MANTISSA_BITS[dtype]
    bits = amax.view(_INT_VIEW[dtype]).to(torch.int64)
    if dtype != torch.float32:
        bits = bits & 0xFFFF
    bump = 1 << (mantissa_bits - element_mantissa_bits - 1)
    sign_and_exponent = ((1 << (_EXPONENT_BITS[dtype] + 1)) - 1) << mantissa_bits
    rounded = (bits + bump) & sign_and_exponent
    if dtype == torch.float32:
        return rounded.to(torch.int32).view(dtype)
    return rounded.to(torch.int32).to(torch.uint16).view(dtype)


def e8m0_exponent(amax: torch.Tensor, element_max: float, element_mantissa_bits: int) -> torch.Tensor:
    """Biased E8M0 scale exponents (uint8) for groups with absolute maximum `amax` (in the weight dtype).

    exponent = 127 + floor(log2(pow2(amax))) - floor(log2(element_max)), clamped to [0, 255]; an all-zero
    group gets 0 (the smallest scale)."""
    offset = int(torch.floor(torch.log2(torch.tensor(element_max))))
    power = round_to_power_of_two(amax, element_mantissa_bits).float()
    exponent = 127 + torch.floor(torch.log2(power)) - offset
    return exponent.clamp(0, 255).to(torch.uint8)


def e8m0_scale(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The power-of-two scale 2**(e - 127) of biased exponents, in `dtype`."""
    return torch.exp2(exponent.to(torch.float32) - 127).to(dtype)

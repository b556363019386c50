"""Bit packing of element codes into the storage layouts compressed-tensors defines (and vLLM reads).

- 4-bit float codes: two per uint8, element 2j in the low nibble, 2j+1 in the high nibble.
- 6-bit float codes: four per three uint8, little-endian.
- b-bit integers (b in 4, 8): 32/b per int32 word, offset by 2**(b-1), element k of a word in bits b*k.., with the
  word stored as a two's-complement int32.
"""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 codes < 16 -> [..., n/2] uint8, first element in the low nibble."""
    pairs = codes.unflatten(-1, (codes.shape[-1] // 2, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def pack_sextets(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 codes < 64 -> [..., 3n/4] uint8: four codes per 24-bit little-endian word."""
    quads = codes.unflatten(-1, (codes.shape[-1] // 4, 4)).to(torch.int32)
    word = quads[..., 0] | quads[..., 1] << 6 | quads[..., 2] << 12 | quads[..., 3] << 18
    packed = torch.stack((word, word >> 8, word >> 16), dim=-1) & 0xFF
    return packed.to(torch.uint8).flatten(-2)


def unpack_sextets(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_sextets`."""
    triples = packed.unflatten(-1, (packed.shape[-1] // 3, 3)).to(torch.int32)
    word = triples[..., 0] | triples[..., 1] << 8 | triples[..., 2] << 16
    shifts = torch.tensor([0, 6, 12, 18], device=packed.device, dtype=torch.int32)
    return ((word.unsqueeze(-1) >> shifts) & 0x3F).to(torch.uint8).flatten(-2)


def _word_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, device=device, dtype=torch.int64)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] signed integers in [-2**(b-1), 2**(b-1)) -> [..., n*b/32] int32 words (n*b divisible by 32)."""
    per_word = 32 // bits
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    words = (unsigned.unflatten(-1, (values.shape[-1] // per_word, per_word)) << _word_shifts(bits, values.device))
    word = words.sum(dim=-1)
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's-complement view of the 32-bit pattern


def unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> signed integers (int8)."""
    unsigned = (words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> _word_shifts(bits, words.device)
    return ((unsigned & ((1 << bits) - 1)) - (1 << (bits - 1))).flatten(-2).to(torch.int8)

"""Text -> token blocks. The offline default text is the Python documentation CPython ships (pydoc_data)."""

from __future__ import annotations

from pathlib import Path

import torch

from prismq.errors import PrismqError


def default_text() -> str:
    """The CPython documentation topics bundled with every Python install (pydoc_data; PSF license).

    Real English technical prose, available without the network; enough for activation-range calibration."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise PrismqError("no default calibration text (pydoc_data missing); pass --calib FILE") from exc
    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(spec: str | None) -> str:
    """The text of a local .txt file, or the default text when spec is None."""
    if spec is None:
        return default_text()
    path = Path(spec)
    if not path.is_file():
        raise PrismqError(f"text file not found: {spec}")
    return path.read_text(encoding="utf-8", errors="replace")


def token_blocks(token_ids: list[int], n_blocks: int, seqlen: int) -> torch.Tensor:
    """The first n_blocks consecutive blocks of seqlen tokens, [n_blocks, seqlen] (fewer if the text is short)."""
    available = len(token_ids) // seqlen
    if available == 0:
        raise PrismqError(f"the text has {len(token_ids)} tokens, fewer than one block of {seqlen}")
    count = min(n_blocks, available)
    return torch.tensor(token_ids[: count * seqlen], dtype=torch.long).reshape(count, seqlen)

"""Text in, token blocks out: documents from files or datasets, disjoint calibration / held-out splits, blocks.

Sources (`spec`): a local `.txt` (WikiText top-level sections, ` = Title = `, are the documents when the file has
them; otherwise paragraphs separated by blank lines), `.jsonl` (field "text", one document per record), `.parquet`
(column "text"; needs pyarrow), a Hugging Face dataset name `NAME[:CONFIG[:SPLIT]]` (needs the `datasets` package
and the network), or None: the offline default, the CPython documentation topics (`pydoc_data.topics`, PSF license).

Calibration, selection and held-out (report) text are split by document before tokenizing, so they are disjoint by
construction: no document, and no document identical in text, is on two sides.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from prismq.errors import PrismqError

_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# A WikiText top-level heading: " = Title = " (exactly one level of '='; " = = Sub = = " is a subsection).
_WIKITEXT_HEADING = re.compile(r"^ ?= (?!=)(?:.*[^=])? = ?$")
_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


def default_documents() -> list[str]:
    """The CPython documentation topics bundled with every Python install (`pydoc_data.topics`; PSF license).

    Real English technical prose available without the network, one document per topic (sorted by topic name, so
    the list is the same on every run)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise PrismqError("no default text (this Python has no pydoc_data); pass a text FILE") from exc
    return [topics[key] for key in sorted(topics) if topics[key].strip()]


def split_wikitext(text: str) -> list[str] | None:
    """The WikiText documents of `text` (each from one ` = Title = ` line to the next), or None when it has none.

    Text before the first heading, if any, is a document of its own."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _WIKITEXT_HEADING.match(line)]
    if not starts:
        return None
    bounds = ([0] if starts[0] > 0 else []) + starts + [len(lines)]
    sections = ("\n".join(lines[a:b]).strip() for a, b in zip(bounds, bounds[1:]))
    return [section for section in sections if section]


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of `text`: runs of lines separated by blank lines, stripped, empty ones dropped."""
    return [part.strip() for part in _BLANK_LINES.split(text.replace("\r\n", "\n")) if part.strip()]


def _read_file_text(path: Path) -> str:
    """The file's text exactly as stored (no newline translation), undecodable bytes replaced."""
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            return handle.read()
    except OSError as exc:
        raise PrismqError(f"cannot read text file {path}: {exc.strerror or exc}") from None


def _jsonl_documents(path: Path) -> list[str]:
    """One document per JSON line's "text" field; blank lines skipped; a bad line is an error naming it."""
    documents = []
    for number, line in enumerate(_read_file_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismqError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise PrismqError(f"{path}:{number} has no string field \"text\"")
        documents.append(record["text"])
    return documents


def _parquet_documents(path: Path) -> list[str]:
    """The "text" column of a parquet file, one document per row (null rows skipped)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrismqError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family for bad files
        raise PrismqError(f"cannot read parquet file {path}: {str(exc).splitlines()[0]}") from None
    if "text" not in table.column_names:
        raise PrismqError(f"{path} has no \"text\" column (columns: {', '.join(table.column_names)})")
    return [value for value in table.column("text").to_pylist() if isinstance(value, str)]


def _dataset_documents(spec: str) -> list[str]:
    """Records' "text" of a Hugging Face dataset `NAME[:CONFIG[:SPLIT]]` (split default "train").

    Datasets stored one line per record (WikiText on the Hub) are rejoined and cut at their ` = Title = ` lines,
    so a document never straddles the split."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise PrismqError(f"{spec!r} is not a local file; loading it as a Hugging Face dataset needs the datasets "
                          "package (pip install datasets) and network access") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        records = load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrismqError(f"cannot load Hugging Face dataset {spec!r}: {reason}") from None
    texts = [record["text"] for record in records if isinstance(record.get("text"), str)]
    if any(_WIKITEXT_HEADING.match(text.rstrip("\r\n")) for text in texts):
        return split_wikitext("".join(t if t.endswith("\n") else t + "\n" for t in texts)) or []
    return texts


def load_documents(spec: str | None) -> list[str]:
    """The documents of a text source (see the module docstring for what `spec` may be); never an empty list."""
    if spec is None:
        documents = default_documents()
    else:
        path = Path(spec).expanduser()
        suffix = path.suffix.lower()
        if path.is_file():
            if suffix == ".jsonl":
                documents = _jsonl_documents(path)
            elif suffix == ".parquet":
                documents = _parquet_documents(path)
            else:
                text = _read_file_text(path)
                documents = split_wikitext(text) or split_paragraphs(text)
        elif path.exists():
            raise PrismqError(f"not a text file: {spec}")
        elif suffix in _FILE_SUFFIXES:
            raise PrismqError(f"text file not found: {spec}")
        else:
            documents = _dataset_documents(spec)
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise PrismqError(f"no text in {spec if spec is not None else 'the default text'}")
    return documents


def read_text(spec: str | None) -> str:
    """The text of a source as one string: a plain file exactly as stored, other sources' documents joined by a
    blank line (the default text when spec is None)."""
    if spec is not None:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() not in (".jsonl", ".parquet"):
            return _read_file_text(path)
    return "\n\n".join(load_documents(spec))


def _rank_key(text: str, seed: int) -> bytes:
    """The seeded position of a document in the split order: a hash of the seed and its text."""
    return hashlib.sha256(f"{seed}\0{text.strip()}".encode("utf-8", "replace")).digest()


def split_documents(documents: Sequence[str], heldout_fraction: float = 0.1, seed: int = 0,
                    sides: str = "calibration and held-out") -> tuple[list[str], list[str]]:
    """Split documents into (calibration, held-out), disjoint by construction, deterministic under `seed`.

    Documents identical in text (after stripping) are kept once, so none lands on both sides. Documents are
    taken in the order of a seeded hash of their text into the held-out side until it holds `heldout_fraction`
    of the characters (at least one document, never all); each side keeps the input order. Splitting by
    characters rather than by count keeps the held-out token count predictable when document lengths vary. `sides`
names the two texts in the error for too few documents."""
    if not 0.0 < heldout_fraction < 1.0:
        raise PrismqError(f"held-out fraction must be between 0 and 1, got {heldout_fraction}")
    unique = list({document.strip(): document for document in documents if document.strip()}.values())
    if len(unique) < 2:
        raise PrismqError(f"cannot split {len(unique)} distinct document(s) into {sides} text; "
                          "give more documents or separate sources (--calib, --heldout, --selection-text)")
    order = sorted(range(len(unique)), key=lambda i: _rank_key(unique[i], seed))
    sizes = torch.tensor([len(unique[i]) for i in order], dtype=torch.float64)
    reached = torch.cumsum(sizes, 0) >= heldout_fraction * float(sizes.sum())
    count = min(max(int(torch.argmax(reached.to(torch.uint8))) + 1, 1), len(unique) - 1)
    heldout = set(order[:count])
    return ([d for i, d in enumerate(unique) if i not in heldout], [d for i, d in enumerate(unique) if i in heldout])


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and concatenated with EOS between them: a 1-D LongTensor."""
    if tokenizer.eos_token_id is None:
        raise PrismqError("the tokenizer has no EOS token to separate documents")
    ids = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return torch.tensor(list(chain.from_iterable(chain(doc, eos) for doc in ids))[:-1], dtype=torch.long)


def _too_short(tokens: int, n_blocks: int, seqlen: int, what: str) -> PrismqError:
    """The error for a text that cannot fill the blocks asked for, with both token counts."""
    return PrismqError(f"{what} has {tokens} tokens; {n_blocks} blocks of {seqlen} need {n_blocks * seqlen} "
                       f"(ask for fewer blocks or a shorter sequence, or give more text)")


def tokenize_blocks(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], n_blocks: int, seqlen: int,
                    seed: int = 0, what: str = "the text") -> torch.Tensor:
    """n_blocks non-overlapping blocks of seqlen tokens, [n_blocks, seqlen], sampled from the whole stream.

    The documents are tokenized with EOS between them, concatenated and cut into consecutive blocks; n of those
    are picked uniformly at random under `seed` (kept in stream order), so the sample spans the text rather than
    its beginning. `what` names the text in the too-short error."""
    if n_blocks < 0 or seqlen < 1:
        raise PrismqError(f"need n_blocks >= 0 and seqlen >= 1, got {n_blocks} and {seqlen}")
    if n_blocks == 0:
        return torch.empty(0, seqlen, dtype=torch.long)
    stream = token_stream(tokenizer, documents)
    available = stream.numel() // seqlen
    if available < n_blocks:
        raise _too_short(stream.numel(), n_blocks, seqlen, what)
    blocks = stream[: available * seqlen].view(available, seqlen)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(available, generator=generator)[:n_blocks].sort().values
    return blocks[picked].clone()


def consecutive_blocks(tokenizer: PreTrainedTokenizerBase, text: str, n_blocks: int, seqlen: int) -> torch.Tensor:
    """The first n_blocks consecutive blocks of seqlen tokens of `text`, [n_blocks, seqlen] (llama-perplexity style).

    The text is tokenized whole, as the tokenizer does by default (its BOS, if it adds one, once at the start), so
    numbers on a standard file (WikiText-2 test at 512) are comparable across tools."""
    if n_blocks < 1 or seqlen < 1:
        raise PrismqError(f"need n_blocks >= 1 and seqlen >= 1, got {n_blocks} and {seqlen}")
    ids = tokenizer(text, verbose=False)["input_ids"]
    if len(ids) < n_blocks * seqlen:
        raise _too_short(len(ids), n_blocks, seqlen, "the text")
    return torch.tensor(ids[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen)


@dataclass(frozen=True)
class TextSplits:
    """The three disjoint token splits of a run (DESIGN.md section 6): calibration (probe, cost, GPTQ), selection
    (every KL a decision is made on) and report (the held-out numbers report.md states; no decision sees them)."""

    calibration: torch.Tensor
    selection: torch.Tensor
    report: torch.Tensor


def _shared_documents(first: list[str], second: list[str]) -> str | None:
    """'N document(s) (e.g. ...)' when two document lists share a document (stripped text), else None."""
    shared = {d.strip() for d in first} & {d.strip() for d in second}
    if not shared:
        return None
    return f"{len(shared)} document(s) (e.g. {next(iter(sorted(shared))).splitlines()[0][:60]!r})"


def text_splits(spec_calib: str | None, spec_report: str | None, spec_selection: str | None,
                tokenizer: PreTrainedTokenizerBase, n_calib: int, n_selection: int, n_report: int, seqlen: int,
                seed: int = 0, report_fraction: float = 0.1, selection_fraction: float = 0.1) -> TextSplits:
    """Calibration, selection and report blocks ([n, seqlen] each) from pairwise disjoint documents.

    The report text is `spec_report` when both it and `spec_calib` are given, else the `report_fraction` of one
    source's documents (`split_documents`; the same report blocks whatever the other settings). The selection text
    is `spec_selection` when given, else the `selection_fraction` of the calibration side's documents (another
    seeded split), so selection never decides on text the report states or the probe was fitted on. Sources that
    share a document are an error: measuring on fitted text would flatter every result."""
    if spec_calib is not None and spec_report is not None:
        calib, report = load_documents(spec_calib), load_documents(spec_report)
    else:
        calib, report = split_documents(load_documents(spec_calib if spec_calib is not None else spec_report),
                                        report_fraction, seed)
    if spec_selection is not None:
        selection = load_documents(spec_selection)
    else:
        calib, selection = split_documents(calib, selection_fraction, seed + 1, "calibration and selection")
    for (name_a, a), (name_b, b) in ((("calibration", calib), ("report", report)),
                                     (("calibration", calib), ("selection", selection)),
                                     (("selection", selection), ("report", report))):
        shared = _shared_documents(a, b)
        if shared:
            raise PrismqError(f"{name_a} and {name_b} text share {shared}; the three splits must be disjoint "
                              "(or give one source to have it split)")
    return TextSplits(tokenize_blocks(tokenizer, calib, n_calib, seqlen, seed, "the calibration text"),
                      tokenize_blocks(tokenizer, selection, n_selection, seqlen, seed, "the selection text"),
                      tokenize_blocks(tokenizer, report, n_report, seqlen, seed, "the held-out (report) text"))

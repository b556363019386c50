"""Text sources and splits: WikiText sections, paragraphs, jsonl/parquet/datasets loading, disjoint and seeded
calibration / held-out splits, block sampling, and the errors a user sees."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from prismq.data import (
    consecutive_blocks,
    default_documents,
    load_documents,
    read_text,
    split_documents,
    split_wikitext,
    text_splits,
    token_stream,
    tokenize_blocks,
)
from prismq.errors import PrismqError

WIKITEXT = """ = Alpha = \r
 Alpha is the first letter . \r
 = = History = = \r
 It came from aleph . \r
\r
 = Beta = \r
 Beta is the second letter . \r
 = = = Use = = = \r
 Physics uses it . \r
 = Gamma ( letter ) = \r
 Gamma is third . \r
"""


class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte, EOS = 256 (enough to test the block logic exactly)."""

    eos_token_id = 256

    def __call__(self, text, add_special_tokens: bool = True, verbose: bool = True):
        encode = lambda t: list(t.encode("utf-8"))  # noqa: E731
        return {"input_ids": [encode(t) for t in text] if isinstance(text, list) else encode(text)}


def make_documents(n: int) -> list[str]:
    return [f"document {i}: " + " ".join(f"w{i}.{j}" for j in range(5 + 7 * i % 11)) for i in range(n)]


def test_wikitext_top_level_sections_are_the_documents(tmp_path: Path) -> None:
    docs = split_wikitext(WIKITEXT)
    assert [d.splitlines()[0].strip() for d in docs] == ["= Alpha =", "= Beta =", "= Gamma ( letter ) ="]
    assert "aleph" in docs[0] and "= = History = =" in docs[0]  # subsections stay inside their article
    assert "Physics" in docs[1]
    path = tmp_path / "wiki.txt"
    path.write_bytes(WIKITEXT.encode())
    assert load_documents(str(path)) == docs
    assert split_wikitext("no headings here\n = = Sub = = \n") is None
    assert split_wikitext("preface\n = Title = \n body\n") == ["preface", "= Title = \n body"]


def test_txt_without_headings_splits_into_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("first paragraph\nstill first\n\n  \nsecond\n\n\nthird = not a heading =\n")
    assert load_documents(str(path)) == ["first paragraph\nstill first", "second", "third = not a heading ="]
    assert read_text(str(path)) == path.read_text()


def test_jsonl_one_document_per_record(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n{"text": "   "}\n')
    assert load_documents(str(path)) == ["one", "two"]
    assert read_text(str(path)) == "one\n\ntwo"
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(PrismqError, match=r"docs.jsonl:2 has no string field \"text\""):
        load_documents(str(path))
    path.write_text('{"text": "one"}\n{oops\n')
    with pytest.raises(PrismqError, match=r"docs.jsonl:2 is not valid JSON"):
        load_documents(str(path))


def test_parquet_text_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), path)
    assert load_documents(str(path)) == ["alpha", "beta"]
    pq.write_table(pa.table({"body": ["alpha"]}), path)
    with pytest.raises(PrismqError, match=r"no \"text\" column \(columns: body\)"):
        load_documents(str(path))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(PrismqError, match="pip install pyarrow"):
        load_documents(str(path))


def test_dataset_name_needs_datasets_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PrismqError, match=r"Hugging Face dataset needs the datasets package \(pip install datasets\)"):
        load_documents("someone/some-corpus")


def test_dataset_records_and_wikitext_lines(monkeypatch) -> None:
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "wikitext":
            return [{"text": line + "\n"} for line in WIKITEXT.replace("\r", "").splitlines()]
        if name == "offline":
            raise ConnectionError("Couldn't reach the Hub\nmore detail")
        return [{"text": "a"}, {"text": "b"}, {"text": None}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_documents("user/corpus") == ["a", "b"]
    wiki = load_documents("wikitext:wikitext-2-raw-v1:test")
    assert len(wiki) == 3 and wiki[0].startswith("= Alpha =")  # lines rejoined into articles
    assert calls[:2] == [("user/corpus", None, "train"), ("wikitext", "wikitext-2-raw-v1", "test")]
    with pytest.raises(PrismqError, match=r"cannot load Hugging Face dataset 'offline': Couldn't reach the Hub$"):
        load_documents("offline")


def test_missing_files_and_empty_text(tmp_path: Path) -> None:
    with pytest.raises(PrismqError, match="text file not found: .*nope.txt"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(PrismqError, match="not a text file"):
        load_documents(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PrismqError, match="no text in"):
        load_documents(str(empty))


def test_default_documents_are_the_pydoc_topics() -> None:
    from pydoc_data.topics import topics

    docs = load_documents(None)
    assert docs == default_documents()
    assert len(docs) == sum(1 for t in topics.values() if t.strip()) > 50
    assert docs[0] == topics[sorted(topics)[0]]


def test_split_is_disjoint_deterministic_and_seeded() -> None:
    docs = make_documents(60)
    calib, heldout = split_documents(docs, 0.2, seed=0)
    assert set(calib).isdisjoint(heldout) and set(calib) | set(heldout) == set(docs)
    assert split_documents(docs, 0.2, seed=0) == (calib, heldout)
    assert split_documents(list(reversed(docs)), 0.2, seed=0)[1] == list(reversed(heldout))  # by text, not place
    assert split_documents(docs, 0.2, seed=1)[1] != heldout
    share = sum(map(len, heldout)) / sum(map(len, docs))
    assert 0.2 <= share < 0.2 + max(map(len, docs)) / sum(map(len, docs))
    assert [d for d in docs if d in calib] == calib  # input order kept


def test_identical_documents_never_straddle_the_split() -> None:
    docs = make_documents(30)
    duplicated = docs + [d + "  \n" for d in docs] + docs[:5]
    for seed in range(20):
        calib, heldout = split_documents(duplicated, 0.3, seed)
        assert {d.strip() for d in calib}.isdisjoint({d.strip() for d in heldout})
        assert len(calib) + len(heldout) == 30


def test_split_errors() -> None:
    with pytest.raises(PrismqError, match="between 0 and 1"):
        split_documents(make_documents(5), 1.0)
    with pytest.raises(PrismqError, match="cannot split 1 distinct document"):
        split_documents(["same", "same "], 0.5)


def test_token_stream_puts_eos_between_documents() -> None:
    stream = token_stream(ByteTokenizer(), ["ab", "c"])
    assert stream.tolist() == [97, 98, 256, 99]


def test_tokenize_blocks_samples_the_whole_stream_deterministically() -> None:
    docs = make_documents(40)
    stream = token_stream(ByteTokenizer(), docs)
    blocks = tokenize_blocks(ByteTokenizer(), docs, 8, 32, seed=0)
    assert blocks.shape == (8, 32) and blocks.dtype == torch.long
    cut = stream[: stream.numel() // 32 * 32].view(-1, 32)
    index = [int((cut == b).all(1).nonzero()[0]) for b in blocks]
    assert index == sorted(set(index))  # distinct, non-overlapping, in stream order
    assert index[-1] > cut.shape[0] // 2 and index != list(range(8))  # not the first blocks
    assert torch.equal(tokenize_blocks(ByteTokenizer(), docs, 8, 32, seed=0), blocks)
    assert not torch.equal(tokenize_blocks(ByteTokenizer(), docs, 8, 32, seed=1), blocks)
    assert tokenize_blocks(ByteTokenizer(), docs, 0, 32).shape == (0, 32)


def test_short_text_error_says_how_many_tokens() -> None:
    with pytest.raises(PrismqError, match=r"the text has 7 tokens; 2 blocks of 4 need 8"):
        tokenize_blocks(ByteTokenizer(), ["abc", "abc"], 2, 4)
    with pytest.raises(PrismqError, match=r"the text has 5 tokens; 3 blocks of 2 need 6"):
        consecutive_blocks(ByteTokenizer(), "hello", 3, 2)


def test_consecutive_blocks_are_the_start_of_the_text() -> None:
    blocks = consecutive_blocks(ByteTokenizer(), "abcdefghij", 2, 4)
    assert blocks.tolist() == [list(b"abcd"), list(b"efgh")]


def test_three_disjoint_splits_from_one_source_two_or_three(tmp_path: Path) -> None:
    docs = make_documents(60)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    splits = text_splits(str(one), None, None, ByteTokenizer(), 6, 2, 3, 16, seed=0)
    assert splits.calibration.shape == (6, 16) and splits.selection.shape == (2, 16)
    assert splits.report.shape == (3, 16)
    # independently: the report side is one seeded split of the documents, the selection side a second split of
    # what is left; the three sets of documents share none
    rest, report_docs = split_documents(docs, 0.1, 0)
    calib_docs, selection_docs = split_documents(rest, 0.1, 1)
    assert calib_docs and selection_docs and report_docs and not (
        set(calib_docs) & set(selection_docs) or set(calib_docs) & set(report_docs)
        or set(selection_docs) & set(report_docs))
    assert len(calib_docs) + len(selection_docs) + len(report_docs) == len(docs)
    assert torch.equal(splits.report, tokenize_blocks(ByteTokenizer(), report_docs, 3, 16, 0))
    assert torch.equal(splits.selection, tokenize_blocks(ByteTokenizer(), selection_docs, 2, 16, 0))
    assert torch.equal(splits.calibration, tokenize_blocks(ByteTokenizer(), calib_docs, 6, 16, 0))
    # only a held-out source: it is split the same way; the report blocks do not depend on the other counts
    assert torch.equal(text_splits(None, str(one), None, ByteTokenizer(), 1, 0, 3, 16).report, splits.report)

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "something else entirely " * 20}) + "\n")
    two = text_splits(str(one), str(other), None, ByteTokenizer(), 2, 1, 1, 16)
    assert bytes(two.report[0].tolist()) in b"something else entirely " * 20
    third = tmp_path / "third.jsonl"
    third.write_text(json.dumps({"text": "a third text for selection " * 20}) + "\n")
    three = text_splits(str(one), str(other), str(third), ByteTokenizer(), 2, 1, 1, 16)
    assert bytes(three.selection[0].tolist()) in b"a third text for selection " * 20
    other.write_text(json.dumps({"text": docs[3] + "\n"}) + "\n")
    with pytest.raises(PrismqError, match=r"calibration and report text share 1 document\(s\) \(e.g. 'document 3"):
        text_splits(str(one), str(other), None, ByteTokenizer(), 2, 1, 1, 16)
    third.write_text(json.dumps({"text": docs[3]}) + "\n")
    with pytest.raises(PrismqError, match=r"calibration and selection text share 1 document"):
        text_splits(str(one), None, str(third), ByteTokenizer(), 2, 1, 1, 16)


def test_default_text_gives_the_three_splits() -> None:
    splits = text_splits(None, None, None, ByteTokenizer(), 4, 2, 4, 256)
    assert splits.calibration.shape == splits.report.shape == (4, 256) and splits.selection.shape == (2, 256)


WIKI_TEST = SHARED_DATA / "wikitext-2-raw-test.txt"


@pytest.mark.slow
@pytest.mark.skipif(not WIKI_TEST.is_file(), reason="../shared/data/wikitext-2-raw-test.txt not present")
def test_real_wikitext_split_shares_no_document_and_no_heldout_block() -> None:
    """On WikiText-2 test with the SmolLM2 tokenizer: no article on two sides, and no report or selection block's
    token sequence occurs anywhere in the calibration token stream (searched as raw int32 bytes at token alignment)."""
    from prismq.model.source import load_tokenizer, resolve_model

    try:
        tokenizer = load_tokenizer(resolve_model(None))
    except PrismqError as exc:
        pytest.skip(f"embedded default model unavailable: {exc}")
    docs = load_documents(str(WIKI_TEST))
    headings = [line for line in WIKI_TEST.read_text(encoding="utf-8").splitlines()
                if line.startswith(" = ") and line.endswith(" = ") and not line.startswith(" = = ")]
    assert len(docs) == len(headings) == 62
    rest, heldout_docs = split_documents(docs, 0.1, seed=0)
    calib_docs, selection_docs = split_documents(rest, 0.1, seed=1)
    assert not (set(calib_docs) & set(heldout_docs) or set(calib_docs) & set(selection_docs)
                or set(selection_docs) & set(heldout_docs))
    splits = text_splits(str(WIKI_TEST), None, None, tokenizer, 32, 8, 16, 512, seed=0)
    calib, heldout = splits.calibration, splits.report
    assert calib.shape == (32, 512) and heldout.shape == (16, 512) and splits.selection.shape == (8, 512)
    stream = token_stream(tokenizer, calib_docs).to(torch.int32).numpy().tobytes()
    for block in torch.cat([heldout, splits.selection]):
        needle = block.to(torch.int32).numpy().tobytes()
        at = stream.find(needle)
        while at != -1 and at % 4:  # a byte-misaligned hit is not a token match; look further
            at = stream.find(needle, at + 1)
        assert at == -1
    # the check can fail: a calibration block is found in the calibration stream
    assert stream.find(calib[0].to(torch.int32).numpy().tobytes()) % 4 == 0


def test_a_calibration_text_of_one_document_cannot_give_a_selection_split(tmp_path: Path) -> None:
    one, other = tmp_path / "one.jsonl", tmp_path / "other.jsonl"
    one.write_text(json.dumps({"text": "only one calibration document " * 40}) + "\n")
    other.write_text(json.dumps({"text": "the held-out text " * 40}) + "\n")
    with pytest.raises(PrismqError, match="into calibration and selection text; give more documents or separate"):
        text_splits(str(one), str(other), None, ByteTokenizer(), 1, 1, 1, 16)
    third = tmp_path / "third.jsonl"
    third.write_text(json.dumps({"text": "a selection text " * 40}) + "\n")
    assert text_splits(str(one), str(other), str(third), ByteTokenizer(), 1, 1, 1, 16).selection.shape == (1, 16)

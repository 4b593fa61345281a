"""tokenizer.py against transformers' LlamaTokenizer reading the same SentencePiece model."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from data import format_prompt
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ours(tokenizer_model) -> Tokenizer:
    return Tokenizer(str(tokenizer_model))


@pytest.fixture(scope="module")
def reference(tokenizer_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    return AutoTokenizer.from_pretrained(directory)


def test_special_ids(ours):
    assert (ours.n_words, ours.vocab_size) == (32000, 32001)
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, 32000)
    assert ours.encode("I believe the meaning of life is", bos=True) == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    assert ours.encode("hi", bos=True, eos=True)[-1] == 2


def test_every_alpaca_record_matches_reference(ours, reference, alpaca_sample):
    records = json.loads(alpaca_sample.read_text())
    assert len(records) == 2000
    # Without a tokenizer_config.json the reference adds no BOS: prepend it ourselves (SPEC).
    assert reference("hello")["input_ids"] == reference.convert_tokens_to_ids(["▁hello"])
    texts = [format_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    batch = ours.encode_batch(texts)
    for text, ids in zip(texts, batch, strict=True):
        expected = [reference.bos_token_id] + reference(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, bos=True) == expected
        assert [ours.bos_id] + ids == expected
        assert ours.decode(ids) == text


@pytest.mark.parametrize(
    "text", ["line one\nline two\n\n\tindented", "emoji 😀🦙 and CJK 中文 日本語", "  leading spaces", "ünïcödé ß"]
)
def test_byte_fallback_round_trips(ours, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids + [ours.pad_id]) == text  # [PAD] is not text


def test_missing_and_invalid_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(bad))


def test_exported_tokenizer_files_load_in_transformers(ours, tokenizer_model, tmp_path):
    from checkpoint import save_tokenizer_files
    from model import ModelArgs

    save_tokenizer_files(str(tmp_path), str(tokenizer_model), ModelArgs(vocab_size=32001, pad_token_id=32000))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 32000)
    assert len(hf) == 32001
    text = format_prompt("Give three tips for staying healthy.") + " Eat well.\nSleep."
    assert hf(text)["input_ids"] == ours.encode(text, bos=True)
    assert hf.decode(ours.encode(text) + [32000], skip_special_tokens=True) == text


def test_token_bytes_spell_out_what_sentencepiece_decodes(ours, alpaca_sample):
    """Token by token, token_bytes (serve.py's logprob tokens) adds up to SentencePiece's own decode of the whole
    sequence: on every Alpaca record, on random ids (byte pieces, control pieces, <unk> among them), and where a
    lone ▁ or a control piece comes first."""
    records = json.loads(alpaca_sample.read_text())
    sequences = [ours.encode(format_prompt(r["instruction"], r["input"]) + r["output"], bos=True) for r in records]
    generator = torch.Generator().manual_seed(0)
    sequences += torch.randint(0, ours.n_words, (2000, 24), generator=generator).tolist()
    sequences += [[29871, 15043], [1, 29871, 15043], [1, 2, 15043], [0, 15043], [68, 15043], [32000, 15043]]
    for ids in sequences:
        spelled, at_start = b"", True
        for id in ids:
            raw = ours.token_bytes(id, at_start)
            if raw is not None:
                spelled += raw
                at_start = False
        assert spelled.decode("utf-8", errors="replace") == ours.decode(ids), ids

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_MODEL = SHARED_DATA / "llama_tokenizer.model"
ALPACA_SAMPLE = SHARED_DATA / "alpaca_sample.json"

sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    assert TOKENIZER_MODEL.is_file(), f"{TOKENIZER_MODEL} is missing: the tests need ../shared/data"
    return TOKENIZER_MODEL


@pytest.fixture(scope="session")
def alpaca_sample() -> Path:
    assert ALPACA_SAMPLE.is_file(), f"{ALPACA_SAMPLE} is missing: the tests need ../shared/data"
    return ALPACA_SAMPLE


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_model) -> str:
    """A random LLaMA with the real 32000-piece vocabulary, written by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return str(path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, alpaca_sample) -> str:
    """64 real Alpaca records: enough for a few steps, with lengths that differ a lot."""
    path = tmp_path_factory.mktemp("data") / "alpaca64.json"
    path.write_text(json.dumps(json.loads(alpaca_sample.read_text())[:64]))
    return str(path)

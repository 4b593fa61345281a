import sys
from pathlib import Path

import pytest

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

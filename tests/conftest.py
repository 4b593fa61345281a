import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_MODEL = SHARED_DATA / "llama_tokenizer.model"
ALPACA_SAMPLE = SHARED_DATA / "alpaca_sample.json"

sys.path.insert(0, str(ROOT))

TRAIN = str(ROOT / "train.py")


CACHE = str(ROOT / ".cache")  # the tokenized-data cache, kept out of the user's home


def run(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN]
        cmd += args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": CACHE}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return result


def common(model: str, data: str, out, **overrides) -> list[str]:
    flags = dict(
        model_name_or_path=model, data_path=data, output_dir=str(out), model_max_length=256, learning_rate=1e-3,
        warmup_ratio=0.2, seed=7, save_strategy="no", logging_steps=1, save_dtype="float32",
    ) | overrides  # fmt: skip
    return [item for k, v in flags.items() for item in (f"--{k}", str(v))]


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "model.safetensors"))


def assert_same_weights(a: dict, b: dict, tol: float, order_changed: bool = False) -> None:
    """Every weight within tol. Where the runs add gradients up in different orders, AdamW, which divides by
    sqrt(v) + eps, turns the rounding of a gradient near eps (a rare token's embedding) into a visible share of
    lr: then one element in 100,000 may differ by up to 10x tol (seen: 1 of 2M at 1.3e-5, all others < 1e-6)."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert diff.max() <= (10 * tol if order_changed else tol), name
        assert (diff > tol).sum() <= (diff.numel() // 100_000 if order_changed else 0), name


def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of checkpoint.meta_to_hf_qk: rotate-half q/k rows back to Meta's interleaved pairs."""
    d, dim = w.shape
    return w.view(n_heads, 2, d // n_heads // 2, dim).transpose(1, 2).reshape(d, dim)


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    assert TOKENIZER_MODEL.is_file(), f"{TOKENIZER_MODEL} is missing: the tests need ../shared/data"
    return TOKENIZER_MODEL


@pytest.fixture(scope="session")
def alpaca_sample() -> Path:
    assert ALPACA_SAMPLE.is_file(), f"{ALPACA_SAMPLE} is missing: the tests need ../shared/data"
    return ALPACA_SAMPLE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_model) -> Path:
    """A tiny random LLaMA with grouped-query attention and a 128-token context, saved by transformers, with the
    real LLaMA tokenizer beside it: the decoding tests' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return path


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

"""--quantize int8 against a reference built apart (transformers' LLaMA with the weights rounded to int8 steps in
fp32), its error against the unquantized model, and --stats."""

import re

import pytest
import torch
from transformers import LlamaForCausalLM

import generate
from checkpoint import load_model
from data import format_prompt
from engine import generate_ids
from optimize import Int8Linear, quantize_int8
from tokenizer import Tokenizer

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Rewrite the following sentence in the passive voice, and explain what changed: The cat chased the mouse.",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return Tokenizer(str(tokenizer_model))


def prompt_ids(tokenizer, prompts):
    return [tokenizer.encode(format_prompt(p), bos=True) for p in prompts]


def dequantized_reference(model_dir) -> LlamaForCausalLM:
    """transformers' fp32 model with every linear weight replaced by its int8 rounding, written out plainly:
    steps of max |row| / 127 per output row, each weight the nearest step."""
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear):
                step = module.weight.abs().amax(dim=1, keepdim=True) / 127
                module.weight.copy_(torch.round(module.weight / step) * step)
    return reference


def test_int8_greedy_equals_a_dequantized_fp32_reference(model_dir, tokenizer):
    model = load_model(str(model_dir))
    quantize_int8(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # all int8
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 4 + 1
    reference = dequantized_reference(model_dir)
    ids = prompt_ids(tokenizer, PROMPTS)
    ours = generate_ids(model, ids, 48, tokenizer.eos_id)  # one batch, left-padded
    for prompt, answer in zip(ids, ours, strict=True):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=48, pad_token_id=0)
        expected = out[0, len(prompt) :].tolist()
        assert len(expected) == len(answer) == 48  # no early EOS: the comparison is as long as it claims
        assert answer == expected


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_are_close_to_the_unquantized_models(model_dir, tokenizer, dtype):
    """Rounding to the nearest of 255 steps of max |row| / 127 errs by at most half a step, uniformly: an rms of
    max |row| / (127 sqrt 12), about 0.7% of a row's rms for these Gaussian rows (max |row| is ~3 times their
    rms). Each product's output then errs by about as much, relative, and the independent errors of 2 layers of
    4 products and the output layer add up in quadrature to about 3 x 0.7%; bf16 activations round each product
    again by 2^-9. The bound is 4%, relative, in the rms over all logits of a prompt and its answer."""
    expected_model = load_model(str(model_dir))
    model = load_model(str(model_dir), dtype=dtype)
    quantize_int8(model)
    ids = prompt_ids(tokenizer, PROMPTS[:1])
    tokens = torch.tensor([ids[0] + generate_ids(model, ids, 32, eos_id=-1)[0]])
    with torch.inference_mode():
        expected = expected_model(tokens)
        ours = model(tokens)
        unquantized = load_model(str(model_dir), dtype=dtype)(tokens)
    error = relative_error(ours, expected)
    assert error < 0.04
    # It is the rounding of the weights that errs, not bf16: int8 errs more than the unquantized model in its dtype.
    assert relative_error(unquantized, expected) < error


def test_cli_stats_prints_two_speeds_on_stderr_only(capsys, model_dir):
    args = ["--model_path", str(model_dir), "--temperature", "0", "--max_new_tokens", "12", "Hi"]
    generate.main(args)
    plain = capsys.readouterr()
    generate.main(args + ["--stats"])
    with_stats = capsys.readouterr()
    assert with_stats.out == plain.out and plain.err == ""
    assert re.fullmatch(r"prompt (\d+\.\d) tok/s, decode (\d+\.\d) tok/s\n", with_stats.err)
    generate.main(args + ["--stats", "--quantize", "int8", "--dtype", "bfloat16"])
    assert re.fullmatch(r"prompt \d+\.\d tok/s, decode \d+\.\d tok/s\n", capsys.readouterr().err)

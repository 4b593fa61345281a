"""Our export through llama.cpp: convert_hf_to_gguf.py to a GGUF file, run with llama-cpp-python, against our own
model: the logits at every position of an Alpaca record (prompt and answer, teacher-forced) and the greedy tokens
that follow its prompt.

    pip download --no-deps --no-binary :all: llama-cpp-python   # its source ships llama.cpp's converter
    tar xzf llama_cpp_python-*.tar.gz && pip install ./llama_cpp_python-*.tar.gz   # compiles llama.cpp: minutes
    python bench/bench_llama_cpp.py --llama_cpp llama_cpp_python-*/vendor/llama.cpp [--model_path out]

Without --model_path, a random LLaMA (dim 256, 2 layers, grouped-query attention, LLaMA's tokenizer and the
added [PAD], vocab 32001) is written by checkpoint.py in bf16, as train.py exports. The GGUF is f32 by default
(--outtype, as the converter's), so only the computation differs between the two sides.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

from checkpoint import load_model, save_hf_checkpoint  # noqa: E402
from data import format_prompt  # noqa: E402
from engine import generate_ids  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

with open(os.path.join(SHARED, "alpaca_sample.json")) as f:
    RECORD = json.load(f)[0]
PROMPT = format_prompt(RECORD["instruction"], RECORD["input"])


def write_random_export(path: str) -> None:
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=688, vocab_size=32001, pad_token_id=32000)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():  # weights of a trained model's scale, not the unit-variance embeddings of a fresh one
        model.embed_tokens.weight.mul_(0.05)
    tokenizer = os.path.join(SHARED, "llama_tokenizer.model")
    save_hf_checkpoint(path, args, model.named_parameters(), tokenizer, torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llama_cpp", required=True, help="a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)")
    p.add_argument("--model_path", help="an HF directory that train.py exported (default: a random one)")
    p.add_argument("--outtype", default="f32", help="convert_hf_to_gguf.py's --outtype: f32, f16, bf16, q8_0")
    p.add_argument("--max_new_tokens", type=int, default=64)
    a = p.parse_args()
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory() as tmp:
        model_path = a.model_path or os.path.join(tmp, "export")
        if a.model_path is None:
            write_random_export(model_path)
        gguf = os.path.join(tmp, f"model-{a.outtype}.gguf")
        env = {**os.environ, "PYTHONPATH": os.path.join(a.llama_cpp, "gguf-py")}
        convert = [sys.executable, os.path.join(a.llama_cpp, "convert_hf_to_gguf.py"), model_path]
        done = subprocess.run([*convert, "--outfile", gguf, "--outtype", a.outtype], capture_output=True, text=True,
                              env=env)  # fmt: skip
        if done.returncode:
            sys.exit(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")

        tokenizer = Tokenizer(os.path.join(model_path, "tokenizer.model"))
        prompt = tokenizer.encode(PROMPT, bos=True)
        record = tokenizer.encode(PROMPT + RECORD["output"], bos=True, eos=True)
        ours = load_model(model_path).eval()
        with torch.no_grad():
            our_logits = ours(torch.tensor([record]))[0].numpy()
        our_tokens = generate_ids(ours, [prompt], a.max_new_tokens, eos_id=-1)[0]

        llm = Llama(model_path=gguf, n_ctx=len(record) + a.max_new_tokens, logits_all=True, verbose=False)
        assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == prompt, "the tokenizers differ"
        llm.eval(record)
        their_logits = np.array(llm.scores[: len(record)])
        llm.reset()
        llm.eval(prompt)
        their_tokens = []
        for _ in range(a.max_new_tokens):  # greedy, through the same eval path
            their_tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([their_tokens[-1]])
    same_argmax = (our_logits.argmax(-1) == their_logits.argmax(-1)).mean()
    agree = next((i for i, (x, y) in enumerate(zip(our_tokens, their_tokens, strict=True)) if x != y), len(our_tokens))
    print(f"{model_path if a.model_path else 'random export (dim 256, 2 layers)'} -> GGUF {a.outtype}; tokenizer: "
          f"the same ids. Teacher-forced, {len(record)} positions: logits max |diff| "
          f"{np.abs(our_logits - their_logits).max():.2e} (largest logit {np.abs(our_logits).max():.2f}), the same "
          f"argmax at {same_argmax:.1%} of positions. Greedy after the prompt: the same {agree} of "
          f"{a.max_new_tokens} tokens ({len(set(our_tokens))} distinct)")  # fmt: skip


if __name__ == "__main__":
    main()

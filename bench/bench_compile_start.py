"""What `serve.py --compile` costs at its first start, and at a later one, on a random LLaMA (8 x 768, bf16):
the time until each batch size's compiled step is ready (built by a background process into an empty cache
directory, then loaded from it), a request answered meanwhile, uncompiled, and the same request once all steps
are in use; the libraries' size on disk.

    python bench/bench_compile_start.py [--max_batch_size 8]
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from random_llama import llama_config
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "llama_tokenizer.model"


def complete(port: int, max_tokens: int) -> tuple[float, str]:
    body = {"prompt": "Give three tips for staying healthy.", "max_tokens": max_tokens, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    text = json.loads(connection.getresponse().read())["choices"][0]["text"]
    return time.perf_counter() - start, text


def start(model_dir: str, max_batch_size: int, n_steps: int, max_tokens: int) -> dict:
    """Starts serve.py --compile; returns when every step is ready, with the times on the way."""
    command = [sys.executable, str(ROOT / "serve.py"), "--model_path", model_dir, "--port", "0", "--compile"]
    command += ["--dtype", "bfloat16", "--max_batch_size", str(max_batch_size)]
    started = time.perf_counter()
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    times, ready = {}, []
    try:
        for line in server.stderr:
            if line.startswith("serving "):
                times["serving"] = time.perf_counter() - started
                port = int(line.split(":")[2].split("/")[0])
                times["answer meanwhile"], uncompiled = complete(port, max_tokens)
            elif "is ready" in line:
                ready.append((int(line.split("batch ")[1].split()[0]), time.perf_counter() - started))
            if len(ready) == n_steps and "serving" in times:
                break
        times["ready"] = ready
        times["answer compiled"], compiled = complete(port, max_tokens)
        times["same answer"] = compiled == uncompiled
    finally:
        server.terminate()
        server.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=128)
    args = parser.parse_args()
    n_steps = len({2**i for i in range(args.max_batch_size.bit_length()) if 2**i < args.max_batch_size}) + 1
    model_dir, cache_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        torch.manual_seed(0)
        LlamaForCausalLM(llama_config(args.dim, args.n_layers, max_positions=2048)).to(torch.bfloat16).save_pretrained(
            model_dir
        )
        shutil.copyfile(TOKENIZER, Path(model_dir) / "tokenizer.model")
        first = start(model_dir, args.max_batch_size, n_steps, args.max_tokens)
        later = start(model_dir, args.max_batch_size, n_steps, args.max_tokens)
        size = sum(f.stat().st_size for f in Path(cache_dir, "decoding").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(model_dir)
        shutil.rmtree(cache_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim {args.dim}, {args.n_layers} layers, "
          f"bf16; --max_batch_size {args.max_batch_size}; {args.max_tokens}-token answers")  # fmt: skip
    for name, times in (("first start", first), ("later start", later)):
        ready = ", ".join(f"batch {b} at {t:.0f} s" for b, t in times["ready"])
        print(f"{name}: serving at {times['serving']:.1f} s; an answer meanwhile {times['answer meanwhile']:.1f} s "
              f"(uncompiled); steps ready: {ready}; the same answer then {times['answer compiled']:.1f} s, "
              f"{'identical' if times['same answer'] else 'DIFFERENT'}")  # fmt: skip
    print(f"the libraries on disk: {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()

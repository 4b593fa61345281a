"""serve.py under load: total generated tokens/s and time to first token with 1, 4 and 8 concurrent clients.

A random LLaMA is written to a temporary directory and served by `python serve.py` in its own process, as a user
runs it. Each client streams `--requests` completions one after another (greedy, `--max_tokens` each, a prompt of
its own) with the standard library's HTTP client; tokens are the server's usage counts, the time is the wall
time from the first request to the last answer, and the first token's time is from sending a request to its
first text event. The levels are measured in turn for several rounds and each level's median reported, with its
ratio to the one-client median of the same run.

    python bench/bench_serve.py --dim 512 --n_layers 8
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench_engine import stream
from random_llama import llama_config
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "llama_tokenizer.model"
PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Describe the water cycle in a few sentences.",
    "Write a haiku about the sea.",
    "Explain why the sky is blue.",
    "List four prime numbers.",
    "Translate 'good morning' into French.",
    "Summarize the plot of Hamlet.",
]


def start_server(model_dir: str) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, str(ROOT / "serve.py"), "--model_path", model_dir, "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    if not line.startswith("serving "):
        raise SystemExit(f"serve.py did not start: {line}{server.stderr.read()}")
    threading.Thread(target=server.stderr.read, daemon=True).start()  # drains the request log
    return server, int(line.split(":")[2].split("/")[0])


def run_clients(port: int, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(total generated tokens/s, median seconds to the first token) of `clients` clients at once."""

    def client(i: int) -> list[tuple[float, int]]:
        answers = [stream(port, PROMPTS[i % len(PROMPTS)], max_tokens) for _ in range(requests)]
        return [(first, tokens) for first, _, tokens, _ in answers]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    seconds = time.perf_counter() - start
    return sum(tokens for _, tokens in results) / seconds, statistics.median(ttft for ttft, _ in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--clients", default="1,4,8", help="concurrency levels, comma-separated; the first is the base")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all levels; the median is reported")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = llama_config(args.dim, args.n_layers, max_positions=512)
    model_dir = tempfile.mkdtemp()
    server = None
    try:
        hf_model = LlamaForCausalLM(config)
        params = sum(p.numel() for p in hf_model.parameters()) / 1e6
        hf_model.save_pretrained(model_dir)
        del hf_model
        shutil.copyfile(TOKENIZER, Path(model_dir) / "tokenizer.model")
        server, port = start_server(model_dir)
        print(f"random LLaMA dim {args.dim}, {args.n_layers} layers ({params:.0f}M parameters), fp32, CPU")
        print(f"each client: {args.requests} streamed greedy completions of {args.max_tokens} tokens in a row")
        run_clients(port, 1, 1, args.max_tokens)  # warm-up: first allocations, kernel choices
        levels = [int(n) for n in args.clients.split(",")]
        runs = {n: [] for n in levels}
        for _ in range(args.rounds):  # the levels in turn, so that a noisy neighbour slows all alike
            for n in levels:
                runs[n].append(run_clients(port, n, args.requests, args.max_tokens))
        print(f"median of {args.rounds} rounds")
        print(f"{'clients':>7}  {'tokens/s':>8}  {'vs 1 client':>11}  {'first token':>11}  tokens/s of each round")
        one_client = statistics.median(rate for rate, _ in runs[levels[0]])
        for n in levels:
            rate, ttft = (statistics.median(values) for values in zip(*runs[n], strict=True))
            each = " ".join(f"{r:.1f}" for r, _ in runs[n])
            print(f"{n:>7}  {rate:>8.1f}  {rate / one_client:>10.2f}x  {ttft * 1000:>8.0f} ms  {each}")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

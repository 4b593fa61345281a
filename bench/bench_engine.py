"""serve.py's per-step scheduling (engine.py) against the batching it replaced, which decoded each batch to its end
before taking new requests: the same random LLaMA, the same requests, both servers up at once and measured in
turn, round after round (the median of --rounds counts).

The baseline is serve.py at --baseline_rev (default: main before the engine), taken out of this repository with
`git archive` into a temporary directory and started from there. Scenarios, each against both servers in turn:

1. short while long: a long answer alone, a short one alone, then the short one sent while the long one decodes;
   the short one's time against its time alone (target: within 2x). And a prompt of about 900 tokens joining
   while an answer streams: that answer's longest gap between tokens meanwhile, against its median gap.
2. Poisson arrivals: --poisson_requests requests at --rate a second (exponential gaps, seeded), answers of 16 to
   256 tokens: p50/p99 time to first token and total generated tokens/s.
3. 8 clients, each streaming --requests completions of 64 tokens in a row: total tokens/s.
4. 200 clients at once, 16 tokens each: how many got an answer, a 429, a reset connection or nothing within
   --hang_seconds; /health's time under that load; the server's peak RSS (VmHWM).

    python bench/bench_engine.py --dim 512 --n_layers 8
"""

import argparse
import http.client
import json
import os
import random
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
from random_llama import llama_config
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import format_prompt, read_records  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BASELINE_REV = "936f117"  # main before the engine: serve.py decoded each batch to its end


class Server:
    """serve.py (from `root`) in a process of its own, on a free port."""

    def __init__(self, root: Path, model_dir: str, flags: list[str]):
        command = [sys.executable, str(root / "serve.py"), "--model_path", model_dir, "--port", "0", *flags]
        self.process = subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE, text=True)
        for line in self.process.stderr:
            if line.startswith("serving "):
                self.port = int(line.split(":")[2].split("/")[0])
                break
        else:
            raise SystemExit(f"{root / 'serve.py'} did not start")
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # drains the request log

    def peak_rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def stream(port: int, prompt: str, max_tokens: int, timeout: float = 600) -> tuple[float, float, int, int]:
    """(seconds to the first text, seconds to the end, completion tokens, status) of one streamed greedy
    completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    first, tokens = None, 0
    if response.status != 200:
        response.read()
        return float("nan"), time.perf_counter() - sent, 0, response.status
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if first is None and event["choices"] and event["choices"][0]["text"]:
            first = time.perf_counter() - sent
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    connection.close()
    return first if first is not None else float("nan"), time.perf_counter() - sent, tokens, 200


def short_while_long(port: int, long_prompt: str, short_prompt: str) -> dict[str, float]:
    long_alone = stream(port, long_prompt, 256)[1]
    short_alone = min(stream(port, short_prompt, 8)[1] for _ in range(3))
    with ThreadPoolExecutor(1) as pool:
        long_run = pool.submit(stream, port, long_prompt, 256)
        time.sleep(long_alone / 8)  # the long answer is decoding
        short_beside = stream(port, short_prompt, 8)[1]
        long_run.result()
    return {"long alone": long_alone, "short alone": short_alone, "short beside long": short_beside}


def long_prompt_joins(port: int, prompt: str, long_prompt: str) -> dict[str, float]:
    """The gaps between the streamed tokens of an answer while a prompt of about 900 tokens joins: prefilled a
    chunk at a time, it should stall the running answer for about a step at a time, not for its whole prefill."""
    arrivals = []

    def running() -> None:
        body = {"prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        for line in connection.getresponse():
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter())

    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(running)
        while len(arrivals) < 20:
            time.sleep(0.01)
        joined = time.perf_counter()
        first_token = stream(port, long_prompt, 1)[0]
        run.result()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    during = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if joined <= b <= joined + first_token]
    return {
        "median gap": statistics.median(gaps),
        "longest gap": max(during or gaps),
        "joiner's first token": first_token,
    }


def poisson(port: int, prompts: list[str], n: int, rate: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(n)]
    lengths = [rng.randint(16, 256) for _ in range(n)]
    start = time.perf_counter()

    def request(i: int) -> tuple[float, float, int, int]:
        time.sleep(max(0.0, sum(gaps[: i + 1]) - (time.perf_counter() - start)))
        return stream(port, prompts[i % len(prompts)], lengths[i])

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(request, range(n)))
    seconds = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {
        "ttft p50": statistics.median(ttft),
        "ttft p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "tokens/s": sum(r[2] for r in results) / seconds,
    }


def clients(port: int, prompts: list[str], n: int, requests: int) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = pool.map(lambda i: [stream(port, prompts[i % len(prompts)], 64) for _ in range(requests)], range(n))
        tokens = sum(r[2] for rs in results for r in rs)
    return {"tokens/s": tokens / (time.perf_counter() - start)}


def burst(server: Server, n: int, hang_seconds: float) -> dict[str, float]:
    """n clients at once: answered, refused (429), reset, hung; /health's time meanwhile; peak RSS."""
    outcomes, barrier = [], threading.Barrier(n + 1)

    def client(_: int) -> str:
        barrier.wait()
        try:
            status = stream(server.port, "Once upon a time", 16, timeout=hang_seconds)[3]
            return {200: "answered", 429: "refused (429)"}.get(status, f"status {status}")
        except (ConnectionError, http.client.RemoteDisconnected):
            return "reset"
        except TimeoutError:
            return "hung"

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(client, i) for i in range(n)]
        barrier.wait()
        time.sleep(0.2)
        health_start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=hang_seconds)
            connection.request("GET", "/health")
            connection.getresponse().read()
            health = time.perf_counter() - health_start
        except OSError:
            health = float("nan")
        outcomes = [future.result() for future in futures]
    result = {kind: outcomes.count(kind) for kind in ("answered", "refused (429)", "reset", "hung")}
    return result | {"health seconds": health, "peak RSS MB": server.peak_rss() / 1e6}


def cpu_name() -> str:
    """lscpu's model name."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")


def baseline_tree(rev: str) -> Path:
    """serve.py and the modules it imports as they were at rev."""
    tree = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--baseline_rev", default=BASELINE_REV)
    parser.add_argument("--poisson_requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals a second (default: 2)")
    parser.add_argument("--requests", type=int, default=3, help="scenario 3: requests per client")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--hang_seconds", type=float, default=300)
    parser.add_argument("--scenarios", default="1,2,3,4")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of scenarios 1-3; the median is reported")
    args = parser.parse_args()
    scenarios = set(args.scenarios.split(","))

    torch.manual_seed(0)
    model_dir = tempfile.mkdtemp()
    baseline = baseline_tree(args.baseline_rev)
    records = read_records(str(SHARED / "alpaca_sample.json"))
    prompts = [format_prompt(instruction, input) for instruction, input, _ in records[:64]]
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        hf_model = LlamaForCausalLM(llama_config(args.dim, args.n_layers, max_positions=1024))
        params = sum(p.numel() for p in hf_model.parameters()) / 1e6
        hf_model.save_pretrained(model_dir)
        del hf_model
        shutil.copyfile(SHARED / "llama_tokenizer.model", Path(model_dir) / "tokenizer.model")
        servers = {
            "engine": Server(ROOT, model_dir, []),
            f"batch to the end ({args.baseline_rev})": Server(baseline, model_dir, []),
        }
        try:
            runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in servers}
            for server in servers.values():
                stream(server.port, prompts[0], 8)  # warm-up: first allocations, kernel choices
            # The servers in turn, round after round, so that a noisy neighbour slows both alike; the median counts.
            for _ in range(args.rounds):
                for name, server in servers.items():
                    side = runs[name]
                    if "1" in scenarios:
                        side.setdefault("short while long", []).append(short_while_long(server.port, prompts[1], "Hi"))
                        side.setdefault("long prompt joins", []).append(
                            long_prompt_joins(server.port, prompts[2], " ".join([prompts[3]] * 12)[:3600])
                        )
                    if "2" in scenarios:
                        side.setdefault("poisson", []).append(
                            poisson(server.port, prompts, args.poisson_requests, args.rate, seed=0)
                        )
                    if "3" in scenarios:
                        side.setdefault("8 clients", []).append(clients(server.port, prompts, 8, args.requests))
            for name, server in servers.items():
                if "4" in scenarios:  # last: a server that resets connections may be left in any state
                    runs[name]["burst"] = [burst(server, args.burst, args.hang_seconds)]
            for name, side in runs.items():
                results[name] = {
                    scenario: {key: statistics.median(run[key] for run in scenario_runs) for key in scenario_runs[0]}
                    for scenario, scenario_runs in side.items()
                }
        finally:
            for server in servers.values():
                server.stop()
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(baseline, ignore_errors=True)

    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; random LLaMA dim {args.dim}, "
          f"{args.n_layers} layers ({params:.0f}M parameters), fp32; serve.py's defaults")  # fmt: skip
    engine, baseline_name = list(results)
    for scenario in results[engine]:
        print(f"\n{scenario}")
        for key in results[engine][scenario]:
            ours, theirs = results[engine][scenario][key], results[baseline_name][scenario][key]
            ratio = f"{ours / theirs:.2f}x" if theirs else ""
            print(f"  {key:<20} engine {ours:>9.3f}   batch to the end {theirs:>9.3f}   {ratio}")
        if scenario == "short while long":
            for name in results:
                times = results[name][scenario]
                print(f"  {name}: the short request beside the long one took "
                      f"{times['short beside long'] / times['short alone']:.1f}x its time alone")  # fmt: skip


if __name__ == "__main__":
    main()

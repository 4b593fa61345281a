"""self_instruct.py with requests in flight against a slow endpoint: requests per minute with 1, 4 and 8 in flight,
each with its ratio to 1 in flight, and whether the outputs are byte for byte the same.

    python bench/bench_self_instruct_requests.py [--latency 1.0] [--requests 16]

The endpoint is local (http.server on 127.0.0.1, a thread per request) and answers each request after --latency
seconds, as a remote model would: five Alpaca records per prompt (of alpaca_sample.json), chosen by the prompt,
so that an answer depends on its prompt only. self_instruct.main runs --requests requests (5 prompts each, seed
0) for each level in turn; the time is its wall time. Latency-bound: CPU contention barely moves the figures.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
import self_instruct  # noqa: E402

LEVELS = (1, 4, 8)
OUTPUT_FILES = ("regen.json", "regen_progress.json", "alpaca_data.json")


def completion(records: list[dict], prompt: str) -> str:
    """Five records numbered on from the prompt's 3 examples, as text-davinci-003 went on from "4. Instruction:"."""
    start = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % (len(records) - 5)
    text = ""
    for number, record in enumerate(records[start : start + 5], start=4):
        opening = "" if number == 4 else f"###\n{number}. Instruction:"
        text += f"{opening} {record['instruction']}\n{number}. Input:\n{record['input'] or '<noinput>'}\n"
        text += f"{number}. Output:\n{record['output']}\n"
    return text


def start_endpoint(records: list[dict], latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            choices = [{"index": i, "text": completion(records, p), "finish_reason": "stop"}
                       for i, p in enumerate(body["prompt"])]  # fmt: skip
            usage = {"prompt_tokens": sum(len(p.split()) for p in body["prompt"]),
                     "completion_tokens": sum(len(c["text"].split()) for c in choices)}  # fmt: skip
            payload = json.dumps({"choices": choices, "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the endpoint takes to answer a request")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    args = parser.parse_args()
    with open(os.path.join(SHARED, "alpaca_sample.json")) as f:
        records = json.load(f)
    server = start_endpoint(records, args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"

    with tempfile.TemporaryDirectory() as tmp:
        seconds, outputs = {}, {}
        for level in LEVELS:
            out = os.path.join(tmp, str(level))
            start = time.perf_counter()
            self_instruct.main([
                "--api_base", url, "--output_dir", out, "--seed_tasks_path", os.path.join(SHARED, "seed_tasks.jsonl"),
                "--num_instructions_to_generate", "1000000", "--max_requests", str(args.requests), "--seed", "0",
                "--max_concurrency", str(level),
            ])  # fmt: skip
            seconds[level] = time.perf_counter() - start
            outputs[level] = [Path(out, name).read_bytes() for name in OUTPUT_FILES]
    server.shutdown()

    same = all(outputs[level] == outputs[1] for level in LEVELS)
    print(f"{args.requests} requests at {args.latency:g} s latency; outputs identical across levels: {same}")
    for level in LEVELS:
        per_minute = args.requests / seconds[level] * 60
        print(f"{level} in flight   {seconds[level]:6.2f} s   {per_minute:6.1f} requests/min   "
              f"{seconds[1] / seconds[level]:5.2f}x")  # fmt: skip
    if not same:
        sys.exit("error: the outputs differ")


if __name__ == "__main__":
    main()

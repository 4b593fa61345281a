"""Judging the 252 self-instruct pairs through a local judge that takes --latency seconds per request (the stand-in
of tests/judge_server.py), with 1 request in flight and with 8, as evaluate.py's command line runs it.

    python bench/bench_evaluate.py [--latency 0.5] [--concurrency 1 8]

Each run starts from an empty output folder, so every pair is judged. Prints each run's time and pairs per second,
the ratio to one in flight, that the leaderboards are identical, and the judge's prompt tokens per pair counted
with the LLaMA tokenizer (GPT-4's tokenizer is not on this machine).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from judge_server import JudgeServer  # noqa: E402

import evaluate  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def judge_once(model_outputs: str, latency: float, concurrency: int) -> tuple[float, str, list[dict]]:
    judge = JudgeServer(latency=latency)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--model_outputs", model_outputs,
                   "--output_path", out, "--api_base", judge.url, "--max_concurrency", str(concurrency)]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        with open(os.path.join(out, evaluate.DEFAULT_ANNOTATOR, "leaderboard.csv")) as f:
            leaderboard = f.read()
    judge.close()
    return seconds, leaderboard, judge.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    # A made-up model: text-davinci-003's answers reversed, so that no pair is identical and all 252 are judged.
    answers = [r | {"output": r["output"][::-1], "generator": "reversed"} for r in evaluate.davinci_outputs()]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(answers, f)
    runs = {n: judge_once(f.name, args.latency, n) for n in args.concurrency}
    os.unlink(f.name)

    base_seconds, base_leaderboard, _ = runs[args.concurrency[0]]
    print(f"252 pairs, judge latency {args.latency} s per request")
    for n, (seconds, leaderboard, _) in runs.items():
        same = "identical leaderboard" if leaderboard == base_leaderboard else "LEADERBOARD DIFFERS"
        print(
            f"  {n} in flight: {seconds:6.1f} s  {252 / seconds:5.1f} pairs/s  {base_seconds / seconds:4.1f}x  {same}"
        )
    # Reversed text takes more tokens than English: count the prompts with text-davinci-003's answer on both sides.
    tokenizer = Tokenizer(os.path.join(SHARED, "llama_tokenizer.model"))
    template = evaluate.JUDGE_TEMPLATE.read_text()
    prompt_tokens = [
        sum(
            len(tokenizer.encode(m["content"]))
            for m in evaluate.judge_messages(template, r["instruction"], *[r["output"]] * 2)
        )
        for r in evaluate.davinci_outputs()
    ]
    print(
        f"judge prompt per pair, text-davinci-003's answer on both sides: {sum(prompt_tokens) / 252:.0f} LLaMA tokens "
        f"on average (min {min(prompt_tokens)}, max {max(prompt_tokens)}), plus 1 completion token"
    )


if __name__ == "__main__":
    main()

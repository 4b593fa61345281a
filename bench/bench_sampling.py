"""The cost of drawing one token at generate.py's default settings (temperature 0.7, top_p 0.9) from LLaMA's
32000 logits, against transformers' warpers and torch.multinomial, in the same run: for a peaked distribution (a
trained model's: a nucleus of a few tokens) and a flat one (a random model's: most of the vocabulary).

    python bench/bench_sampling.py
"""

import sys
import time
from pathlib import Path

import torch
from bench_decode import cpu_name
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import sample  # noqa: E402


def transformers_sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scores = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


def milliseconds(draw, runs: int = 500) -> float:
    for _ in range(10):
        draw()
    start = time.perf_counter()
    for _ in range(runs):
        draw()
    return (time.perf_counter() - start) / runs * 1e3


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; one row of 32000 logits")
    for name, scale in [("peaked", 6.0), ("flat", 0.02)]:
        logits = torch.randn(1, 32000, generator=generator) * scale
        kept = int((TopPLogitsWarper(0.9)(None, logits / 0.7) > float("-inf")).sum())
        ours = milliseconds(lambda logits=logits: sample(logits, 0.7, 0.9, 0, generator))
        theirs = milliseconds(lambda logits=logits: transformers_sample(logits, generator))
        print(f"{name} (nucleus of {kept}): ours {ours:.3f} ms, transformers {theirs:.3f} ms: {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()

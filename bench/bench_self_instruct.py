"""ROUGE-L deduplication of self_instruct.py against the original's, on real instructions.

    python bench/bench_self_instruct.py [--limit 2000]

The 2,000 instructions of alpaca_sample.json, in order, are deduplicated against the 175 seed tasks: by
self_instruct.deduplicate, once in one call and once in slices of 85 (one request's worth: 5 prompts of about
17 items), and by the original's loop (generate_instruction.py's, with rouge_score, its process pool replaced
by a plain loop: one process). Prints each time, the ratio, and checks that all three keep the same records
with the same 10 most similar instructions, scores and mean scores.

Then the scale of a full Alpaca run: one request's 85 items against a pool of 52,002 instructions (those of
alpaca_sample.json with their words shuffled, over and over), ours against the original's loop on the first
5 of the 85 (all 85 would take it minutes), per item.
"""

import argparse
import json
import os
import random
import sys
import time

import numpy as np
from rouge_score import rouge_scorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
from self_instruct import InstructionPool, deduplicate, read_seed_tasks  # noqa: E402


def original_deduplicate(items: list[dict], pool: list[str]) -> list[dict]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_instructions = list(pool)
    all_instruction_tokens = [scorer._tokenizer.tokenize(inst) for inst in all_instructions]
    kept = []
    for item in items:
        new_tokens = scorer._tokenizer.tokenize(item["instruction"])
        rouge_scores = [rouge_scorer._score_lcs(new_tokens, tokens).fmeasure for tokens in all_instruction_tokens]
        most_similar = {all_instructions[i]: rouge_scores[i] for i in np.argsort(rouge_scores)[-10:][::-1]}
        if max(rouge_scores) > 0.7:
            continue
        kept.append(
            dict(item, most_similar_instructions=most_similar, avg_similarity_score=float(np.mean(rouge_scores)))
        )
        all_instructions.append(item["instruction"])
        all_instruction_tokens.append(new_tokens)
    return kept


def ours(items: list[dict], pool_instructions: list[str], slice_size: int) -> list[dict]:
    pool = InstructionPool(pool_instructions)
    kept = []
    for start in range(0, len(items), slice_size):
        kept += deduplicate([dict(item) for item in items[start : start + slice_size]], pool)
    return kept


def timed(f, *args) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    result = f(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=2000, help="instructions of alpaca_sample.json to use")
    args = parser.parse_args()
    with open(os.path.join(SHARED, "alpaca_sample.json")) as f:
        items = json.load(f)[: args.limit]
    seeds = [task["instruction"] for task in read_seed_tasks(os.path.join(SHARED, "seed_tasks.jsonl"))]

    ours_one_call, kept_one_call = timed(ours, items, seeds, len(items))
    ours_by_request, kept_by_request = timed(ours, items, seeds, 85)
    reference, kept_reference = timed(original_deduplicate, items, seeds)
    # json.dumps compares everything, the dicts' order and the floats' every bit (repr) included.
    same = json.dumps(kept_one_call) == json.dumps(kept_reference) == json.dumps(kept_by_request)
    print(f"{len(items)} instructions against {len(seeds)} seeds: {len(kept_reference)} kept; identical: {same}")
    print(f"original (rouge_score, one process)  {reference:8.2f} s")
    print(f"ours, one call                       {ours_one_call:8.2f} s   {reference / ours_one_call:6.1f}x")
    print(f"ours, 85 at a time                   {ours_by_request:8.2f} s   {reference / ours_by_request:6.1f}x")
    if not same:
        sys.exit("error: the kept records differ")

    rng = random.Random(0)
    pool = list(seeds)
    while len(pool) < 52002:
        words = rng.choice(items)["instruction"].split()
        rng.shuffle(words)
        pool.append(" ".join(words))
    request = [dict(item, instruction=" ".join(rng.sample(item["instruction"].split(), 3)) + " " + item["instruction"])
               for item in rng.sample(items, 85)]  # fmt: skip
    ours_request, kept = timed(ours, request, pool, 85)
    reference, kept_reference = timed(original_deduplicate, request[:5], pool)
    same = json.dumps(kept[: len(kept_reference)]) == json.dumps(kept_reference)  # the first 5's kept ones
    print(f"85 items against {len(pool)}: {len(kept)} kept; the first 5 identical: {same}")
    print(f"original (first 5)    {reference / 5 * 1000:8.0f} ms an item")
    print(
        f"ours                  {ours_request / 85 * 1000:8.0f} ms an item   {reference / 5 * 85 / ours_request:6.1f}x"
    )
    if not same:
        sys.exit("error: the kept records differ")


if __name__ == "__main__":
    main()

"""The embedded sample: a small instruction data set whose answers can be checked exactly, a SentencePiece
tokenizer trained on it and a tiny randomly initialised LLaMA, so that the whole pipeline runs on a laptop CPU
with no download.

    python sample_data.py [--out sample] [--seed 0] [--tokenizer llama_tokenizer.model]

writes OUT/train.json and OUT/heldout.json (Alpaca records, each with a `task` field naming its task, which the
pipeline ignores) and OUT/model/, a Hugging Face LLaMA directory with its tokenizer.model, which train.py
starts from when it is given no model. The same seed writes the same files. With --tokenizer, that
SentencePiece model (LLaMA's, say) is copied instead of training one, and the model's vocabulary matches it.
"""

import argparse
import io
import os
import random
import sys
from collections.abc import Callable

import sentencepiece as spm
import torch
from torch import nn

from checkpoint import save_hf_checkpoint, write_json
from cli import ArgumentParser
from data import format_prompt
from model import ModelArgs, Transformer, count_parameters
from tokenizer import Tokenizer

N_TRAIN = 7500  # 3 epochs of 32-record steps: 705 optimizer steps, about 2 minutes on 2 CPU cores
N_HELDOUT = 100
VOCAB_SIZE = 512  # every template and task word is one piece; the data holds too few words for 1024
# 0.56M parameters. Many narrow heads learn these tasks in far fewer steps than a few wide ones: in the same
# 600 steps, 16 heads of 8 dimensions got 90-98% of the held-out answers right, 4 heads of 32 got 60%.
MODEL = dict(dim=128, n_layers=2, n_heads=16, hidden_dim=384, max_seq_len=256)

Record = tuple[str, str, str]  # instruction, input, output

# Every answer is one number that the model finds among the digits of the prompt: the largest, the smallest, the
# first, the last, or how many there are. A tiny model learns tasks like these from scratch in a few hundred
# steps; sorting, reversing, two-digit addition or looking a value up by its key took it thousands.


def digits(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(low, high))]


def spaced(numbers: list[int]) -> str:
    return " ".join(str(n) for n in numbers)


def largest(rng: random.Random) -> Record:
    # The answer is drawn first, uniformly, then the other numbers below it. Drawn the other way round, 9 would
    # be the answer almost half the time, and always answering 9 a shortcut the model learns before the task.
    # From 4 up: lists that top out at 2 or 3 are so few that the held-out set would take most of them, and the
    # model would be asked for an answer it has hardly seen.
    answer = rng.randint(4, 9)
    numbers = [answer, *rng.sample(range(answer), rng.randint(2, min(5, answer)))]
    rng.shuffle(numbers)
    instruction = rng.choice(["What is the largest of {x}?", "Which number is the biggest: {x}?"])
    return instruction.format(x=", ".join(str(x) for x in numbers)), "", str(answer)


def smallest(rng: random.Random) -> Record:
    answer = rng.randint(0, 5)
    numbers = [answer, *rng.sample(range(answer + 1, 10), rng.randint(2, min(5, 9 - answer)))]
    rng.shuffle(numbers)
    instruction = rng.choice(["What is the smallest number in the list?", "Find the minimum."])
    return instruction, spaced(numbers), str(answer)


def first(rng: random.Random) -> Record:
    numbers = digits(rng, 3, 6)
    instruction = rng.choice(["What is the first number in the list?", "Which number comes first?"])
    return instruction, spaced(numbers), str(numbers[0])


def last(rng: random.Random) -> Record:
    numbers = digits(rng, 3, 6)
    instruction = rng.choice(["What is the last number in {x}?", "Name the last item of {x}."])
    return instruction.format(x=", ".join(str(n) for n in numbers)), "", str(numbers[-1])


def count(rng: random.Random) -> Record:
    numbers = digits(rng, 2, 7)
    instruction = rng.choice(["How many numbers are in {x}?", "Count the numbers in {x}."])
    return instruction.format(x=", ".join(str(n) for n in numbers)), "", str(len(numbers))


# Two of the five tasks have an input: 40% of the records, as in Alpaca.
TASKS: dict[str, Callable[[random.Random], Record]] = {
    "largest": largest,
    "smallest": smallest,
    "first": first,
    "last": last,
    "count": count,
}


def make_records(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out records, tasks in turn; no (instruction, input) pair is in both sets, or twice."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    sets = []
    for n in (n_heldout, n_train):
        records = []
        while len(records) < n:
            task = list(TASKS)[len(records) % len(TASKS)]
            instruction, input, output = TASKS[task](rng)
            if (instruction, input) in seen:
                continue
            seen.add((instruction, input))
            records.append({"instruction": instruction, "input": input, "output": output, "task": task})
        rng.shuffle(records)
        sets.append(records)
    heldout, train = sets
    return train, heldout


def train_tokenizer(records: list[dict], path: str) -> None:
    """A SentencePiece model with LLaMA's conventions: BPE, byte fallback for any character it has not seen,
    digits split one by one (so numbers are learnable digit by digit), ids 0/1/2 = <unk>/<s>/</s> and no
    pad piece. Prompts and answers are separate sentences, so no piece spans the prompt's final ':' and the
    answer: the labels' mask boundary falls between tokens, and a prompt alone encodes as it does in training."""
    sentences = [format_prompt(r["instruction"], r["input"]) for r in records] + [r["output"] for r in records]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",  # LLaMA's: text is kept as it is, newlines included
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same pieces on every run
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(proto.getvalue())


def init_weights(model: Transformer) -> None:
    """normal(0, 0.02) for every matrix, the initializer_range of LLaMA's config (nn.Linear's default would be
    uniform, scaled by fan-in); the norms keep their ones."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


def write_model(out_dir: str, tokenizer_path: str, seed: int) -> ModelArgs:
    tokenizer = Tokenizer(tokenizer_path)
    model_args = ModelArgs(**MODEL, vocab_size=tokenizer.n_words)
    torch.manual_seed(seed)
    model = Transformer(model_args)
    init_weights(model)
    save_hf_checkpoint(out_dir, model_args, model.named_parameters(), tokenizer_path, dtype=torch.float32)
    return model_args


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sample", help="output directory (default: sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the records and the weights (default: 0)")
    parser.add_argument("--tokenizer", help="copy this SentencePiece model (e.g. LLaMA's) instead of training one")
    try:
        args = parser.parse_args()
        if args.tokenizer is not None:
            Tokenizer(args.tokenizer)  # fails with one line before anything is written
        train, heldout = make_records(N_TRAIN, N_HELDOUT, args.seed)
        model_dir = os.path.join(args.out, "model")
        os.makedirs(model_dir, exist_ok=True)
        write_json(os.path.join(args.out, "train.json"), train)
        write_json(os.path.join(args.out, "heldout.json"), heldout)
        tokenizer_path = os.path.join(model_dir, "tokenizer.model")
        if args.tokenizer is None:
            train_tokenizer(train, tokenizer_path)
        model_args = write_model(model_dir, args.tokenizer or tokenizer_path, args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"{args.out}: {len(train)} training and {len(heldout)} held-out records; {model_dir}: "
        f"{count_parameters(model_args) / 1e6:.2f} M parameters, vocabulary {model_args.vocab_size}"
    )


if __name__ == "__main__":
    main()

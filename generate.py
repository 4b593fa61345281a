"""Prompting a LLaMA checkpoint from the command line: the Alpaca template, greedy decoding or sampling
(temperature, top-k, top-p), many prompts decoded together by the engine (engine.py), and each answer streamed as
it is produced.

    python generate.py --model_path out "Give three tips for staying healthy."
    python generate.py --model_path out --prompts prompts.txt --output_format jsonl > answers.jsonl
    python generate.py --model_path out --eval_data heldout.json   # exact match and loss on Alpaca records

As a library, see engine.generate and engine.generate_ids.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from cli import ArgumentParser, check_ranges, exit_on_user_error
from data import decode_text, format_prompt, load_dataset, parse_records, rank_micro_batches, read_records
from engine import Engine, Request, TextStream, check_prompt_lengths, generate, row_seeds
from loading import add_model_flags, load_for_decoding, load_tokenizer, model_path_or_default
from model import Transformer
from optimize import CompiledSteps
from tokenizer import Tokenizer


@torch.inference_mode()
def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    data_path: str,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    compiled: CompiledSteps | None = None,
) -> tuple[int, int, float]:
    """(exact matches, records, mean loss per supervised token) of the model on an Alpaca file. An answer
    matches when the greedy answer and the record's output are equal once stripped of surrounding whitespace.
    The loss is teacher-forced on the tokens and labels that training uses (data.load_dataset), so it compares
    with the loss train.py logs. Records whose prompt alone fills the model's context are left out of both."""
    dataset = load_dataset(data_path, tokenizer, model.model_args.max_seq_len)
    all_records = read_records(data_path)
    records = [all_records[i] for i in dataset.source_indices]
    prompts = [format_prompt(instruction, input) for instruction, input, _ in records]
    answers = generate(model, tokenizer, prompts, max_new_tokens, compiled=compiled, max_batch_size=batch_size)
    matches = sum(answer.strip() == output.strip() for answer, (*_, output) in zip(answers, records, strict=True))
    device = model.embed_tokens.weight.device
    summed_loss = 0.0
    for start in range(0, len(records), batch_size):
        n = min(batch_size, len(records) - start)
        # Right padding follows every real token, so the causal mask hides it from them, and it has no label:
        # any id will do.
        (tokens,) = rank_micro_batches(
            dataset, np.arange(start, start + n), 0, 1, n, False, model.model_args.max_seq_len, pad_id=0
        )
        summed_loss += model(tokens.input_ids.to(device), labels=tokens.labels.to(device)).item()
    return matches, len(records), summed_loss / dataset.total_supervised()


# ---------------------------------------------------------------------------------------------------------
# Command line


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(instruction, input) pairs from a file, or stdin for "-": Alpaca JSON or JSON Lines records (instruction and
    optional input, validated as training data is) if the text starts with '[' or '{', else one prompt per
    non-blank line."""
    if path == "-":
        raw, path = sys.stdin.buffer.read(), "<stdin>"
    else:
        with open(path, "rb") as f:
            raw = f.read()
    text = decode_text(raw, path)
    if not text.lstrip().startswith(("[", "{")):
        return [(line, "") for line in text.splitlines() if line.strip()]
    return [(instruction, input) for instruction, input, _ in parse_records(text, path, need_output=False)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Answer instructions with an Alpaca-tuned LLaMA. A prompt is wrapped in the Alpaca template "
        "(the one with an input section if --input is given), and only the answer is printed, streamed as it "
        "is produced, up to EOS or --max_new_tokens. A prompt that leaves no room for an answer in the model's "
        "context (max_position_embeddings) is an error, not cut; a shorter room shortens the answer.",
    )
    parser.add_argument("prompt", nargs="?", help="the instruction (or, with --raw, the whole prompt)")
    add_model_flags(parser)
    parser.add_argument("--input", help="the input (context) that goes with the instruction")
    parser.add_argument("--raw", action="store_true", help="use the prompts as they are, without the template")
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts from FILE ('-': stdin), run in batches: Alpaca JSON (a list of records with instruction "
        "and optional input; detected by the leading '[') or one prompt per line",
    )
    parser.add_argument(
        "--eval_data",
        metavar="FILE",
        help="instead of answering prompts, score the model on an Alpaca JSON file: greedy answers that equal the "
        "records' outputs (exact match) and the mean loss on the supervised tokens",
    )
    parser.add_argument(
        "--batch_size", type=int, default=8,
        help="prompts decoded together: when an answer ends, the next prompt takes its place (default: 8)",
    )  # fmt: skip
    parser.add_argument("--max_new_tokens", type=int, default=256, help="answer length limit (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default: 0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, in (0, 1] (default: 0.9)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely (default: 0, all)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    parser.add_argument(
        "--output_format",
        choices=["text", "jsonl"],
        default="text",
        help="text: the answers in order, a blank line between them, each streamed once those before it are out. "
        "jsonl: one {prompt, input, answer} object per line (default: text)",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="after the answers, print on stderr the prompt (prefill) and decoding speed in tokens/s",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step: tokens come faster after a minute or more of compiling, again for each "
        "new --batch_size and cache length (prompt + answer, by 256 tokens). On the CPU the compiled step is kept "
        "on disk (in TORCHINDUCTOR_CACHE_DIR) and a later run with the same model and settings loads it in seconds",
    )

    args = parser.parse_args(argv)
    if [args.prompt, args.prompts, args.eval_data].count(None) != 2:
        raise ValueError("give one prompt, or --prompts FILE (or - for stdin), or --eval_data FILE")
    if args.eval_data is not None and args.stats:
        raise ValueError("--stats times answering prompts, not --eval_data")
    if args.eval_data is not None and (args.raw or args.input is not None):
        raise ValueError("--eval_data takes the instructions and inputs from its records, in the Alpaca template")
    if args.prompts is not None and args.input is not None:
        raise ValueError("--input goes with a single prompt; give inputs in Alpaca JSON records with --prompts")
    if args.raw and args.input is not None:
        raise ValueError("--raw uses the prompt as it is, so there is no template to put --input in")
    check_ranges(
        args,
        {"temperature": ">= 0", "top_p": "in (0, 1]", "top_k": ">= 0", "max_new_tokens": ">= 1", "batch_size": ">= 1"},
    )
    args.model_path = model_path_or_default(args.model_path)
    return args


class InOrder:
    """Prints the answers in the order of the prompts while the engine finishes them in any order: the first
    answer not yet printed is streamed as it grows, the others wait whole for their turn."""

    def __init__(self, tokenizer: Tokenizer, prompts: list[tuple[str, str]], output_format: str):
        self.prompts, self.output_format = prompts, output_format
        self.streams = [TextStream(tokenizer) for _ in prompts]
        self.held = [""] * len(prompts)  # text of answers whose turn has not come
        self.ended = [False] * len(prompts)
        self.next = 0  # the first answer not fully printed

    def add(self, i: int, token: int) -> None:
        text = self.streams[i].add(token)
        if i == self.next and self.output_format == "text":
            print(text, end="", flush=True)
        else:
            self.held[i] += text

    def end(self, i: int) -> None:
        self.ended[i] = True
        while self.next < len(self.prompts) and self.ended[self.next]:
            i, self.next = self.next, self.next + 1
            if self.output_format == "jsonl":
                instruction, input = self.prompts[i]
                answer = self.held[i] + self.streams[i].finish()
                print(json.dumps({"prompt": instruction, "input": input, "answer": answer}, ensure_ascii=False))
            else:
                last = i == len(self.prompts) - 1
                print(self.held[i] + self.streams[i].finish(), end="\n" if last else "\n\n")
                if not last:  # the next answer's text so far; the rest is streamed as it comes
                    print(self.held[i + 1], end="")
                    self.held[i + 1] = ""
            sys.stdout.flush()


def run_eval(args: argparse.Namespace) -> None:
    model_args, tokenizer = load_tokenizer(args)
    load_dataset(args.eval_data, tokenizer, model_args.max_seq_len)  # every record checked before the slow load
    model, compiled = load_for_decoding(args)
    matches, n_records, loss = evaluate(
        model, tokenizer, args.eval_data, args.batch_size, args.max_new_tokens, compiled
    )
    print(f"exact match {matches}/{n_records} = {matches / n_records:.1%}   supervised-token loss {loss:.4f}")


def run(args: argparse.Namespace) -> None:
    if args.eval_data is not None:
        run_eval(args)
        return
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts")
    else:
        prompts = [(args.prompt, args.input or "")]
    if args.raw:
        with_input = [i for i, (_, input) in enumerate(prompts) if input]
        if with_input:
            raise ValueError(f"{args.prompts}: record {with_input[0]} has an input, which --raw has no template for")
        texts = [instruction for instruction, _ in prompts]
    else:
        texts = [format_prompt(instruction, input) for instruction, input in prompts]

    model_args, tokenizer = load_tokenizer(args)
    prompt_ids = [tokenizer.encode(text, bos=True) for text in texts]
    check_prompt_lengths(prompt_ids, model_args.max_seq_len)  # all of them, before the slow load
    model, compiled = load_for_decoding(args)

    printer = InOrder(tokenizer, prompts, args.output_format)
    longest = max(len(ids) for ids in prompt_ids) + args.max_new_tokens
    # Rounded up, so that a later run finds a compiled step for the same cache length.
    max_len = min(-(-longest // 256) * 256, model_args.max_seq_len)
    engine = Engine(model, tokenizer.eos_id, min(args.batch_size, len(prompts)), max_len=max_len, compiled=compiled)
    requests = [
        Request(ids, args.max_new_tokens, args.temperature, args.top_p, args.top_k, seed,
                on_token=lambda token, _, i=i: token != tokenizer.eos_id and printer.add(i, token),
                on_end=lambda _, i=i: printer.end(i))
        for i, (ids, seed) in enumerate(zip(prompt_ids, row_seeds(args.seed, len(prompt_ids)), strict=True))
    ]  # fmt: skip
    engine.submit(requests)
    engine.run_until_done()
    if failed := next((r for r in requests if r.finish_reason == "error"), None):
        raise RuntimeError(f"decoding failed: {failed.error}")
    if args.stats:
        stats = engine.stats
        # nan: one token only, which came from the prompt's step
        decode_speed = stats["tokens"] / stats["decode_seconds"] if stats["tokens"] else float("nan")
        prompt_speed = stats["prompt_tokens"] / stats["prompt_seconds"]
        print(f"prompt {prompt_speed:.1f} tok/s, decode {decode_speed:.1f} tok/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        try:
            run(parse_args(argv))
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as the Python docs recommend
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)


if __name__ == "__main__":
    main()

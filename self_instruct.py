"""Self-instruct data generation as Alpaca did it (stanford_alpaca's generate_instruction.py): prompt a model
with 3 random seed tasks and ask for 20 more, parse the answers, filter them, drop near-duplicates by ROUGE-L,
and repeat until enough instructions are kept.

    python self_instruct.py --api_base http://127.0.0.1:8000/v1 --model_name MODEL --output_dir gen \
        --seed_tasks_path seed_tasks.jsonl --num_instructions_to_generate 100 --max_concurrency 8
    python self_instruct.py --api_base https://api.openai.com/v1 --api_type chat --model_name gpt-4o-mini ...
    python self_instruct.py --model_path out --output_dir gen --seed_tasks_path seed_tasks.jsonl

writes gen/regen.json (the original's records, rewritten after every request and read back on a restart),
gen/regen_progress.json (the requests taken so far, the items parsed and the tokens used) and, at the end,
gen/alpaca_data.json (instruction, input, output), which `train.py --data_path` reads as it is.

With --max_concurrency N, up to N calls are in flight: to the endpoint, or with --model_path to our decoding
engine, which decodes their prompts side by side, each answer sampled from a seed of its own. Request n's prompts
depend only on --seed and n, and the answers are taken in request order, so the output is the same for every N,
and a run resumed after a kill gives what the uninterrupted run would have.
"""

import argparse
import json
import os
import random
import re
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
from tqdm import tqdm

from checkpoint import write_json
from cli import ArgumentParser, check_ranges, exit_on_user_error
from data import decode_text, json_lines
from engine import Engine, Request, check_prompt_lengths, row_seeds
from http_client import error_message, is_worth_retrying, post_json, retry_pause
from loading import add_model_flags, load_for_decoding, load_tokenizer
from tokenizer import Tokenizer

Answer = tuple[list[dict], dict]  # choices {text, finish_reason}, usage {prompt_tokens, completion_tokens}
Complete = Callable[[list[str], int, tuple[int, int]], Answer]  # (prompts, sampling seed, turn) -> answer

PROMPT_HEADER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "self_instruct_prompt.txt")
MAX_TOKENS = 3072  # the original asks for the most it can get; an endpoint that refuses gets 0.8x as much
STOP = ["\n20", "20.", "20."]  # the original's list, its repeat included
STOP_WINDOW = 16  # tokens that hold any 3 characters, even spelled as 4 UTF-8 byte tokens each
SIMILARITY_LIMIT = 0.7  # an instruction whose ROUGE-L F-measure with any earlier one exceeds this is dropped
BLOCKED_WORDS = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
]  # fmt: skip
REQUEST_TIMEOUT = 600.0  # seconds to wait for one response: 5 prompts x 3072 tokens can take minutes
RETRY_DELAY = 2.0  # seconds before the first retry (the original's), doubling up to 60
MAX_TRIES = 8
TOKEN_COUNTS = ("prompt_tokens", "completion_tokens")
PROGRESS_COUNTS = ("requests", "generated", *TOKEN_COUNTS)
ALL_ONES = ~np.uint64(0)


# ---------------------------------------------------------------------------------------------------------
# Seed tasks, the prompt, and parsing the answers


def read_seed_tasks(path: str) -> list[dict]:
    """{instruction, input, output} of each task of a seed_tasks.jsonl file, from its first instance."""
    tasks = []
    with open(path, "rb") as f:
        text = decode_text(f.read(), path)
    for line_no, task in json_lines(text, path):
        task = task if isinstance(task, dict) else {}
        instances = task.get("instances")
        first = instances[0] if isinstance(instances, list) and instances else None
        if not (
            isinstance(task.get("instruction"), str)
            and isinstance(first, dict)
            and all(isinstance(first.get(field), str) for field in ("input", "output"))
        ):
            raise ValueError(
                f"{path}: line {line_no}: expected a task with a string 'instruction' and 'instances', "
                "a list whose first item has string 'input' and 'output'"
            )
        tasks.append({"instruction": task["instruction"], "input": first["input"], "output": first["output"]})
    if not tasks:
        raise ValueError(f"{path}: no seed tasks")
    return tasks


def encode_prompt(header: str, examples: list[dict]) -> str:
    """The header, the examples numbered from 1, and the opening of the next one for the model to go on from."""
    prompt = header + "\n"
    for i, example in enumerate(examples, start=1):
        instruction = re.sub(r"\s+", " ", example["instruction"]).strip().rstrip(":")
        input = example["input"] or "<noinput>"
        prompt += f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{input}\n{i}. Output:\n{example['output']}\n"
    return prompt + f"###\n{len(examples) + 1}. Instruction:"


def is_usable(instruction: str) -> bool:
    """The original's filters: 4 to 150 words, no task a text model cannot do (images, files, ...), not
    "Write a program" (the model adds it to everything), starting with neither punctuation nor non-ASCII."""
    n_words = len(instruction.split())
    return (
        3 < n_words <= 150
        and not any(re.search(rf"\b({word})\b", instruction, flags=re.IGNORECASE) for word in BLOCKED_WORDS)
        and not instruction.startswith("Write a program")
        and instruction[0] not in string.punctuation
        and instruction[0].isascii()
    )


def parse_completion(text: str, finish_reason: str, num_prompt_instructions: int) -> list[dict]:
    """The usable {instruction, input, output} items of one completion, numbered on from the prompt's."""
    pieces = f"{num_prompt_instructions + 1}. Instruction:{text}".split("###")
    if finish_reason == "length":
        pieces = pieces[:-1]  # cut off mid-item
    items = []
    for number, piece in enumerate(pieces, start=num_prompt_instructions + 1):
        # Unanchored, as the original: "14. Input:" also splits where 4 is expected.
        parts = re.split(rf"{number}\.\s+(Instruction|Input|Output):", piece)
        if len(parts) != 7:
            continue
        instruction, input, output = parts[2].strip(), parts[4].strip(), parts[6].strip()
        if is_usable(instruction):
            items.append(
                {"instruction": instruction, "input": "" if input.lower() == "<noinput>" else input, "output": output}
            )
    return items


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L, many pairs at once


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's tokens without stemming: lowercase, then the runs of [a-z0-9]."""
    return re.findall(r"[a-z0-9]+", text.lower())


def add_bit_vectors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for bit vectors held as little-endian uint64 words along the last axis, the carry crossing words."""
    total = a + b
    if a.shape[-1] == 1:
        return total
    carry = total[..., 0] < a[..., 0]
    for w in range(1, a.shape[-1]):
        word = total[..., w] + carry
        carry = (total[..., w] < a[..., w]) | (word < carry)  # a + b overflowed, or adding the carry did
        total[..., w] = word
    return total


def lcs_lengths(queries: list[np.ndarray], rows: list[np.ndarray], max_pairs: int = 1 << 18) -> np.ndarray:
    """The LCS length of every (query, row) pair of token-id sequences (ids >= 0), shape (queries, rows),
    max_pairs pairs at a time (2 MB arrays, which the caches hold). The rows are sorted longest first, so
    that a step of bit_parallel_lcs touches only the rows still going, a prefix."""
    lcs = np.zeros((len(queries), len(rows)), dtype=np.int64)
    if not queries or not rows:
        return lcs
    row_lens = np.array([len(row) for row in rows])
    order = np.argsort(-row_lens, kind="stable")
    sorted_lens = row_lens[order]
    starts = np.concatenate([[0], np.cumsum(sorted_lens)[:-1]])
    flat = np.concatenate([rows[i] for i in order] + [np.zeros(0, dtype=np.int64)])
    n_tokens = 1 + max(int(ids.max(initial=-1)) for ids in [flat, *queries])
    size = max(1, max_pairs // len(rows))
    for first in range(0, len(queries), size):
        chunk = queries[first : first + size]
        lcs[first : first + size, order] = bit_parallel_lcs(chunk, sorted_lens, starts, flat, n_tokens).T
    return lcs


def bit_parallel_lcs(
    queries: list[np.ndarray], sorted_lens: np.ndarray, starts: np.ndarray, flat: np.ndarray, n_tokens: int
) -> np.ndarray:
    """LCS lengths (rows, queries) of rows given as their lengths (longest first), where each starts in flat.

    Bit-parallel: a query is a bit vector V, one bit per token, and each
    token t of a row updates it as U = V & match(t); V = (V + U) | (V - U). The zero bits of V then count
    the LCS. All pairs advance together, one row position per step."""
    n_words = max(1, -(-max(len(q) for q in queries) // 64))
    match = np.zeros((n_tokens, len(queries), n_words), dtype=np.uint64)
    for i, query in enumerate(queries):
        positions = np.arange(len(query))
        bits = np.left_shift(np.uint64(1), (positions % 64).astype(np.uint64))
        np.bitwise_or.at(match, (query, i, positions // 64), bits)

    v = np.full((len(sorted_lens), len(queries), n_words), ALL_ONES)
    for j in range(int(sorted_lens[0])):
        going = int(np.count_nonzero(sorted_lens > j))
        active = v[:going]
        u = active & match[flat[starts[:going] + j]]
        v[:going] = add_bit_vectors(active, u) | (active ^ u)  # V - U is V ^ U: U's bits are all in V

    query_lens = np.array([len(q) for q in queries])
    bits_used = np.clip(query_lens[:, None] - 64 * np.arange(n_words), 0, 64).astype(np.uint64)
    masks = np.where(bits_used > 0, ALL_ONES >> (np.uint64(64) - bits_used.clip(min=1)), np.uint64(0))
    return query_lens[None, :] - np.bitwise_count(v & masks).sum(axis=-1, dtype=np.int64)


def rouge_l(queries: list[np.ndarray], rows: list[np.ndarray], max_pairs: int = 1 << 18) -> np.ndarray:
    """rouge_score's ROUGE-L F-measure (query as target, row as prediction) of every pair, with its float
    operations in its order, so that the values are the same to the last bit."""
    lcs = lcs_lengths(queries, rows, max_pairs)
    row_lens = np.array([len(row) for row in rows])
    query_lens = np.array([len(q) for q in queries])
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / row_lens[None, :]
        recall = lcs / query_lens[:, None]
        fmeasure = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, fmeasure, 0.0)


class InstructionPool:
    """The instructions new ones are compared with: the seed tasks', then every one kept, in order."""

    def __init__(self, instructions: list[str]):
        self.vocab: dict[str, int] = {}  # token -> id, for the tokens seen so far
        self.texts = list(instructions)
        self.ids = [self.encode(text) for text in self.texts]

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.vocab.setdefault(t, len(self.vocab)) for t in rouge_tokens(text)], dtype=np.int64)


def deduplicate(items: list[dict], pool: InstructionPool, max_pairs: int = 1 << 18) -> list[dict]:
    """The items to keep, in order, each with its 10 most similar instructions and their mean similarity,
    exactly as the original: an item is compared with the whole pool and every item kept before it, and
    dropped if any ROUGE-L F-measure exceeds 0.7. Kept items join the pool. Items come a request's worth at a
    time: all pairs among them are scored, kept or not.

    The length bound (F <= 2 min(la, lb) / (la + lb)) could spare only the pairs of dropped items, and few of
    those, instructions being of similar lengths (BENCHMARKS.md): a kept item stores the mean over all its
    pairs. So every pair is scored, all at once by rouge_l."""
    ids = [pool.encode(item["instruction"]) for item in items]
    versus_pool = rouge_l(ids, pool.ids, max_pairs)
    versus_items = rouge_l(ids, ids, max_pairs)
    n = len(pool.texts)
    kept: list[int] = []
    for i, item in enumerate(items):
        scores = np.concatenate([versus_pool[i], versus_items[i, kept]])
        if scores.max() > SIMILARITY_LIMIT:
            continue
        # Ties fall as numpy's argsort leaves them, on the same array as the original's.
        top = np.argsort(scores)[-10:][::-1]
        names = [pool.texts[j] if j < n else items[kept[j - n]]["instruction"] for j in top]
        item["most_similar_instructions"] = {name: float(scores[j]) for name, j in zip(names, top, strict=True)}
        item["avg_similarity_score"] = float(np.mean(scores))
        kept.append(i)
    pool.texts += [items[i]["instruction"] for i in kept]
    pool.ids += [ids[i] for i in kept]
    return [items[i] for i in kept]


# ---------------------------------------------------------------------------------------------------------
# Requests in flight: taken in request order, sent at most N at a time, fewer after a 429


def answers_in_order(
    calls: Callable[[int], list[tuple[list[str], int]]], complete: Complete, first: int, end: int | None, window: int
) -> Iterator[tuple[int, list[Answer]]]:
    """(number, answers) of requests first, first + 1, ... up to end (None: on and on), in that order; a request
    is its calls, (prompts, sampling seed) each, and has an answer for each. Up to `window` requests are in flight
    or answered ahead of the one the output waits for, each call on a thread of its own; with a window of 1,
    each call is made in this thread, one after another, as the original did."""
    number = first
    if window == 1:
        while end is None or number < end:
            yield number, [complete(prompts, seed, (number, i)) for i, (prompts, seed) in enumerate(calls(number))]
            number += 1
        return

    answered: dict[tuple[int, int], Answer | Exception] = {}
    n_calls: dict[int, int] = {}
    ready = threading.Condition()

    def call(number: int, i: int, prompts: list[str], seed: int) -> None:
        try:
            answer = complete(prompts, seed, (number, i))
        except Exception as e:  # raised in order, when the output gets to its request
            answer = e
        with ready:
            answered[number, i] = answer
            ready.notify()

    started = first
    while end is None or number < end:
        while started < number + window and (end is None or started < end):
            request = calls(started)
            n_calls[started] = len(request)
            for i, (prompts, seed) in enumerate(request):
                threading.Thread(target=call, args=(started, i, prompts, seed), daemon=True).start()
            started += 1
        keys = [(number, i) for i in range(n_calls.pop(number))]
        with ready:
            while not all(key in answered for key in keys):
                ready.wait()
        answers = [answered.pop(key) for key in keys]
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        yield number, answers
        number += 1


class Cancelled(Exception):
    """The run is over: a request still waiting for its turn is not sent."""


class Throttle:
    """Lets HTTP requests go, at most `limit` in flight, lowest turn first: the request the output waits for goes
    before those after it. AIMD, as TCP does: a 429 halves the limit, once for all the requests sent before that
    cut (a burst of 429s is one signal), and holds every request back for the pause the endpoint asked for; each
    `limit` answers in a row then add one back, up to `most`."""

    def __init__(self, most: int):
        self.most = self.limit = most
        self.in_flight = self.answered = self.cuts = 0
        self.paused_until = 0.0  # time.monotonic()
        self.waiting: set[tuple[int, int]] = set()
        self.closed = False
        self.changed = threading.Condition()

    @contextmanager
    def turn(self, key: tuple[int, int]) -> Iterator[int]:
        """Waits for key's turn, then holds a place in flight; gives the number of cuts so far, for rate_limited."""
        with self.changed:
            self.waiting.add(key)
            try:
                while not self.closed and not self.may_send(key):
                    self.changed.wait(max(0.0, self.paused_until - time.monotonic()) or None)
            finally:
                self.waiting.remove(key)
                self.changed.notify_all()
            if self.closed:
                raise Cancelled
            self.in_flight += 1
            cuts = self.cuts
        try:
            yield cuts
        finally:
            with self.changed:
                self.in_flight -= 1
                self.changed.notify_all()

    def may_send(self, key: tuple[int, int]) -> bool:
        return self.in_flight < self.limit and key == min(self.waiting) and time.monotonic() >= self.paused_until

    def rate_limited(self, cuts_when_sent: int, pause: float) -> None:
        with self.changed:
            if cuts_when_sent == self.cuts:
                self.limit = max(1, self.limit // 2)
                self.cuts += 1
                self.answered = 0
            self.paused_until = max(self.paused_until, time.monotonic() + pause)

    def succeeded(self) -> None:
        with self.changed:
            self.answered += 1
            if self.answered >= self.limit and self.limit < self.most:
                self.limit += 1
                self.answered = 0
                self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


# ---------------------------------------------------------------------------------------------------------
# Backends: an OpenAI-compatible endpoint, or our own checkpoint


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint, and the settings every request to it carries."""

    api_base: str
    api_type: str  # "completions": the prompts of a request in one call; "chat": each as one user message
    model_name: str
    temperature: float
    top_p: float
    api_key: str | None
    throttle: Throttle


def complete_over_http(endpoint: Endpoint, prompts: list[str], turn: tuple[int, int]) -> Answer:
    """The answer to one request for the prompts (one prompt for chat), sent when the throttle gives it its turn.
    Rate limits, server errors and timeouts are retried with growing pauses, or the pause a Retry-After asks
    for; a context-length refusal is retried asking for 0.8x the tokens, as the original did."""
    is_chat = endpoint.api_type == "chat"
    url = endpoint.api_base.rstrip("/") + ("/chat/completions" if is_chat else "/completions")
    body = {
        "model": endpoint.model_name, "max_tokens": MAX_TOKENS, "temperature": endpoint.temperature,
        "top_p": endpoint.top_p, "n": 1, "stop": STOP,
    }  # fmt: skip
    if is_chat:
        (prompt,) = prompts
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompts
    tries = 0
    while True:
        with endpoint.throttle.turn(turn) as cuts:
            status, raw, retry_after = post_json(url, body, endpoint.api_key, REQUEST_TIMEOUT)
        if status == 200:
            endpoint.throttle.succeeded()
            return read_answer(url, raw, is_chat)
        message = error_message(raw)
        if status == 400 and ("maximum context length" in message or "Please reduce your prompt" in message):
            body["max_tokens"] = int(body["max_tokens"] * 0.8)
            if body["max_tokens"] < 1:
                raise ValueError(f"{url}: the prompt alone fills the model's context ({message})")
            continue
        if not is_worth_retrying(status):
            raise ValueError(f"{url}: HTTP {status}: {message}")
        tries += 1
        if tries == MAX_TRIES:
            raise ValueError(f"{url}: gave up after {tries} tries (last: {status or 'no answer'}: {message})")
        pause = retry_pause(tries, retry_after, time.time(), RETRY_DELAY)
        if status == 429:  # the endpoint asks all of us to slow down
            endpoint.throttle.rate_limited(cuts, pause)
        else:
            time.sleep(pause)


def read_answer(url: str, raw: bytes, is_chat: bool) -> Answer:
    """The choices ({text, finish_reason}) and token usage of a response; usage the endpoint leaves out counts 0."""
    try:
        response = json.loads(raw)
    except ValueError:
        raise ValueError(f"{url}: the response is not JSON: {raw[:100]!r}") from None
    choices = response.get("choices") if isinstance(response, dict) else None
    texts = [choice_text(choice, is_chat) for choice in choices] if isinstance(choices, list) else [None]
    if None in texts or not all(isinstance(choice.get("finish_reason"), str | None) for choice in choices):
        fields = "'message' with a 'content'" if is_chat else "'text'"
        raise ValueError(f"{url}: expected 'choices', a list of objects with {fields} and 'finish_reason'")
    usage = response.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    tokens = {key: usage[key] if type(usage.get(key)) is int else 0 for key in TOKEN_COUNTS}
    return [{"text": text, "finish_reason": c["finish_reason"]} for text, c in zip(texts, choices, strict=True)], tokens


def choice_text(choice: object, is_chat: bool) -> str | None:
    """The text of a completions choice, or of a chat choice's message (a null content is no text); None if the
    choice has neither."""
    if not isinstance(choice, dict):
        return None
    if not is_chat:
        return choice["text"] if isinstance(choice.get("text"), str) else None
    message = choice.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str | None):
        return None
    return message.get("content") or ""


def complete_locally(
    engine: Engine, tokenizer: Tokenizer, prompts: list[str], temperature: float, top_p: float, seed: int | None,
    stop: list[str],
) -> Answer:  # fmt: skip
    """The completions ({text, finish_reason}) of our checkpoint, and the tokens read and written, as an endpoint
    would give them: each text ends before its first stop string ("stop"), at EOS ("stop"), or when MAX_TOKENS
    or the model's context ran out ("length"). The engine runs in its own thread (Engine.start), and calls from
    several threads are decoded side by side."""
    prompt_ids = [tokenizer.encode(prompt, bos=True) for prompt in prompts]
    check_prompt_lengths(prompt_ids, engine.max_len)

    def watch_for_stops(request: Request, token: int, logits: None) -> bool:
        # Only the last tokens can hold a stop string just completed: decoding all would be quadratic.
        return any(s in tokenizer.decode(request.output_ids[-STOP_WINDOW:]) for s in stop)

    requests = [
        Request(ids, MAX_TOKENS, temperature, top_p, seed=row_seed)
        for ids, row_seed in zip(prompt_ids, row_seeds(seed, len(prompt_ids)), strict=True)
    ]
    for request in requests:
        request.on_token = partial(watch_for_stops, request)
    engine.submit(requests)
    choices = []
    for request in requests:
        request.ended.wait()
        if request.finish_reason == "error":
            raise RuntimeError(f"decoding failed: {request.error}")
        text = tokenizer.decode(request.output_ids)
        cut = min((text.find(s) for s in stop if s in text), default=None)
        finish_reason = "length" if cut is None and request.finish_reason == "length" else "stop"
        choices.append({"text": text if cut is None else text[:cut], "finish_reason": finish_reason})
    completion_tokens = sum(len(request.output_ids) for request in requests)
    return choices, {"prompt_tokens": sum(map(len, prompt_ids)), "completion_tokens": completion_tokens}


# ---------------------------------------------------------------------------------------------------------
# Files


def read_json(path: str, default: object) -> object:
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}): move it away to start over") from None


def read_kept(path: str) -> list[dict]:
    """The records of an earlier run's regen.json, checked."""
    records = read_json(path, [])
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records: move it away to start over")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("instruction", "input", "output")
        ):
            raise ValueError(f"{path}: record {i}: expected string 'instruction', 'input' and 'output'")
    return records


def read_progress(path: str, n_kept: int) -> dict:
    """{requests, generated, prompt_tokens, completion_tokens} of the runs so far (a regen.json from elsewhere
    comes without: none known)."""
    progress = read_json(path, {"requests": 0, "generated": n_kept})
    if isinstance(progress, dict):
        progress = dict.fromkeys(TOKEN_COUNTS, 0) | progress  # a file from before usage was counted
    if not (isinstance(progress, dict) and all(type(progress.get(k)) is int for k in PROGRESS_COUNTS)):
        fields = ", ".join(f'"{k}": N' for k in PROGRESS_COUNTS)
        raise ValueError(f"{path}: expected {{{fields}}}: move it away to start over")
    return progress


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Generate Alpaca-style instruction data by self-instruct, as stanford_alpaca's "
        "generate_instruction.py did, from an OpenAI-compatible endpoint (--api_base) or our own checkpoint "
        "(--model_path). Rerun the same command to resume.",
    )
    parser.add_argument("--output_dir", default="./", help="where regen.json and alpaca_data.json go (default: ./)")
    parser.add_argument("--seed_tasks_path", default="./seed_tasks.jsonl", help="(default: ./seed_tasks.jsonl)")
    parser.add_argument("--num_instructions_to_generate", type=int, default=100, help="(default: 100)")
    parser.add_argument("--api_base", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1; "
                        "the key comes from OPENAI_API_KEY")  # fmt: skip
    parser.add_argument("--model_name", default="text-davinci-003", help="with --api_base (default: text-davinci-003)")
    add_model_flags(parser)  # --model_path: our own checkpoint instead, decoded as generate.py does
    parser.add_argument("--compile", action="store_true", help="with --model_path: compile the decoding steps in a "
                        "process of their own while decoding goes on uncompiled, each used once it is ready "
                        "(minutes the first time; kept on disk for later runs)")  # fmt: skip
    parser.add_argument("--num_prompt_instructions", type=int, default=3, help="seed tasks per prompt (default: 3)")
    parser.add_argument("--request_batch_size", type=int, default=5, help="prompts per request (default: 5)")
    parser.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0)")
    parser.add_argument("--top_p", type=float, default=1.0, help="(default: 1.0)")
    parser.add_argument("--seed", type=int, help="random seed: the same seed draws the same seed tasks (and, with "
                        "--model_path, samples the same tokens), across restarts too")  # fmt: skip
    parser.add_argument("--max_requests", type=int, help="stop after this many requests in all, counting those "
                        "of the runs resumed (default: until enough instructions are kept)")  # fmt: skip
    parser.add_argument("--api_type", choices=("completions", "chat"), default="completions",
                        help="with --api_base: a request's prompts go to /completions in one call, as the "
                        "original sent them, or each as one user message to /chat/completions "
                        "(default: completions)")  # fmt: skip
    parser.add_argument("--max_concurrency", type=int, default=1, help="calls in flight at once (with "
                        "--model_path: requests decoded side by side); the output does not depend on it "
                        "(default: 1)")  # fmt: skip

    args = parser.parse_args(argv)
    if (args.api_base is None) == (args.model_path is None):
        raise ValueError("give one backend: --api_base URL (an OpenAI-compatible endpoint) or --model_path DIR")
    counts = ["num_instructions_to_generate", "num_prompt_instructions", "request_batch_size", "max_requests"]
    check_ranges(
        args, dict.fromkeys([*counts, "max_concurrency"], ">= 1") | {"temperature": ">= 0", "top_p": "in (0, 1]"}
    )
    if args.model_path is not None and args.api_type != "completions":
        raise ValueError("--api_type is for --api_base: --model_path decodes a request's prompts as the "
                         "completions endpoint does")  # fmt: skip
    return args


def make_backend(args: argparse.Namespace, throttle: Throttle) -> Complete:
    """complete(prompts, sampling seed, turn) -> answer, for the backend the flags name."""
    if args.api_base is not None:
        api_key = os.environ.get("OPENAI_API_KEY")
        endpoint = Endpoint(
            args.api_base, args.api_type, args.model_name, args.temperature, args.top_p, api_key, throttle
        )
        return lambda prompts, seed, turn: complete_over_http(endpoint, prompts, turn)
    # The way generate.py loads a checkpoint, with its defaults for the device and the dtype; --compile builds
    # the compiled steps in the background, the engine decoding uncompiled until each is ready.
    _, tokenizer = load_tokenizer(args)
    model, compiled = load_for_decoding(args, in_background=True)
    engine = Engine(model, tokenizer.eos_id, args.request_batch_size * args.max_concurrency, compiled=compiled)
    engine.start()
    return lambda prompts, seed, turn: complete_locally(
        engine, tokenizer, prompts, args.temperature, args.top_p, seed, STOP
    )


def run(args: argparse.Namespace) -> None:
    seed_tasks = read_seed_tasks(args.seed_tasks_path)
    if args.num_prompt_instructions > len(seed_tasks):
        raise ValueError(f"--num_prompt_instructions {args.num_prompt_instructions}: {args.seed_tasks_path} has "
                         f"only {len(seed_tasks)} tasks")  # fmt: skip
    with open(PROMPT_HEADER_PATH, encoding="utf-8") as f:
        header = f.read()
    os.makedirs(args.output_dir, exist_ok=True)
    regen_path = os.path.join(args.output_dir, "regen.json")
    progress_path = os.path.join(args.output_dir, "regen_progress.json")
    kept = read_kept(regen_path)
    progress = read_progress(progress_path, len(kept))
    write_json(regen_path, kept, indent=4)  # an output directory we cannot write fails now, not after a request
    throttle = Throttle(args.max_concurrency)
    complete = make_backend(args, throttle)
    pool = InstructionPool([task["instruction"] for task in seed_tasks] + [record["instruction"] for record in kept])
    prompts_per_call = 1 if args.api_type == "chat" else args.request_batch_size

    def calls(number: int) -> list[tuple[list[str], int]]:
        # One generator per request, seeded by its number: request n draws the same prompts whichever order the
        # answers come back in, and after a restart.
        rng = random.Random(f"{args.seed}:{number}") if args.seed is not None else random.Random()
        prompts = [
            encode_prompt(header, rng.sample(seed_tasks, args.num_prompt_instructions))
            for _ in range(args.request_batch_size)
        ]
        seed = rng.randrange(2**63)
        return [(prompts[i : i + prompts_per_call], seed) for i in range(0, len(prompts), prompts_per_call)]

    requests = answers_in_order(calls, complete, progress["requests"], args.max_requests, args.max_concurrency)
    started, answered = time.monotonic(), 0
    with tqdm(total=args.num_instructions_to_generate, initial=len(kept), unit="instruction", desc="kept") as bar:
        try:
            for _, answers in requests if len(kept) < args.num_instructions_to_generate else ():
                items = [
                    item
                    for choices, _ in answers
                    for choice in choices
                    for item in parse_completion(choice["text"], choice["finish_reason"], args.num_prompt_instructions)
                ]
                new = deduplicate(items, pool)
                kept += new
                progress["requests"] += 1
                progress["generated"] += len(items)
                for key in TOKEN_COUNTS:
                    progress[key] += sum(usage[key] for _, usage in answers)
                # Only answers taken in order are saved: a restart asks again for those that came ahead of their
                # turn. regen.json first: a crash between the two writes repeats a request whose items are then
                # duplicates.
                write_json(regen_path, kept, indent=4)
                write_json(progress_path, progress, indent=4)
                answered += 1
                bar.update(len(new))
                bar.set_postfix({
                    "requests": progress["requests"],
                    "req/min": f"{answered / (time.monotonic() - started) * 60:.1f}",
                    "tokens": f"{progress['prompt_tokens']:,} in, {progress['completion_tokens']:,} out",
                    "keep_rate": f"{len(kept) / max(1, progress['generated']):.0%}",
                })  # fmt: skip
                if len(kept) >= args.num_instructions_to_generate:
                    break
        finally:
            throttle.close()  # calls still waiting for their turn are not sent

    data_path = os.path.join(args.output_dir, "alpaca_data.json")
    write_json(data_path, [{k: record[k] for k in ("instruction", "input", "output")} for record in kept], indent=4)
    print(
        f"kept {len(kept)} of {progress['generated']} instructions parsed from {progress['requests']} requests "
        f"({progress['prompt_tokens']:,} prompt and {progress['completion_tokens']:,} completion tokens); "
        f"wrote {regen_path} and {data_path}"
    )


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():  # on Ctrl-C too, regen.json holds every request taken so far
        run(parse_args(argv))


if __name__ == "__main__":
    main()

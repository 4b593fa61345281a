"""The interactive demo: an OpenAI-compatible HTTP API over generate.py's decoding, and a chat page at `/`.

    python serve.py --model_path out          # then open http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Give three tips for staying healthy."}]}'

Routes: GET /v1/models, POST /v1/completions (the raw prompt with BOS prepended, as `generate.py --raw`; a list of
prompts gives one choice each; token ids are taken as they are), POST /v1/chat/completions (the conversation's
last user message is the instruction in the Alpaca template; when the last two messages are both the user's, they
are the instruction and its input; earlier turns are left out, as Alpaca answers single instructions),
GET /health, and GET / for the chat page.
`stream: true` sends server-sent events (`data: {json}` lines, then `data: [DONE]`). `logprobs` (with `top_logprobs`
on chat) gives each token's log_softmax of the model's logits before temperature, in OpenAI's shapes; `echo` on
completions gives the prompt's tokens too, each scored by the prefill's logits at the position before it.

One thread owns the model and decodes. Each HTTP request's thread puts a Job per prompt on a queue and reads the
answer back from the job's own queue. The jobs waiting when a batch starts are decoded together (up to
--max_batch_size), each row with its own temperature, top_p, seed, max_tokens and stop strings, so a greedy
answer does not depend on its neighbours. A job whose client has gone away, or whose time is up, is finished at
the next token; a new job waits for the running batch to end.
"""

import argparse
import codecs
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from torch import Tensor

from cli import ArgumentParser
from data import format_prompt
from generate import (
    TextStream,
    add_model_flags,
    check_prompt_lengths,
    generate_ids,
    load_for_decoding,
    load_tokenizer,
    model_path_or_default,
    sample,
)
from model import Transformer
from tokenizer import PAD_PIECE, Tokenizer

CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 1 << 20
GATHER_SECONDS = 0.02  # how long a new batch waits for requests sent at the same moment as its first
ROUTES = {"/": "GET", "/health": "GET", "/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat answers may fill the context


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One answer to produce. The request thread fills the first fields; the decoding thread owns the rest and
    reports to `events`: ("text", index, text, tokens) as the answer grows (tokens: the TokenLogprobs of the tokens
    whose text starts in it, with logprobs wanted), then ("end", index, finish_reason), or ("error", index,
    message)."""

    index: int  # the choice's index in its response
    prompt_ids: list[int]
    max_tokens: int  # already capped by the room the context leaves
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    logprobs: int | None  # how many most likely tokens to give with each token's logprob (None: no logprobs)
    echo: str | None  # the prompt's text, which the choice starts with (None: no echo)
    deadline: float  # time.monotonic() at which the answer is cut
    events: queue.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    text: str = ""
    sent: int = 0  # characters of text already put on events
    offset: int = 0  # characters before the answer in the choice's text: the echoed prompt's
    tokens: list["TokenLogprob"] = field(default_factory=list)  # the answer's tokens, with logprobs wanted
    tokens_sent: int = 0
    scores: tuple[Tensor, Tensor, Tensor] | None = None  # logprobs_of the token just picked, for advance
    n_tokens: int = 0
    done: bool = False


# ---------------------------------------------------------------------------------------------------------
# Decoding thread


def decode_forever(
    model: Transformer,
    tokenizer: Tokenizer,
    decode_step,
    jobs: queue.Queue,
    max_batch_size: int,
    stopping: threading.Event,
) -> None:
    """Decodes the jobs that come, a batch at a time, until `stopping` is set (a None job wakes it to see that)."""
    while not stopping.is_set():
        batch = next_batch(jobs, max_batch_size)
        if not batch:
            continue
        try:
            decode_batch(model, tokenizer, decode_step, batch, stopping)
        except Exception as e:  # a bug fails the requests of its batch, not the server
            for job in batch:
                if not job.done:
                    job.events.put(("error", job.index, f"decoding failed: {type(e).__name__}: {e}"))


def next_batch(jobs: queue.Queue, max_batch_size: int) -> list[Job]:
    """The next job to come, with those waiting or arriving within GATHER_SECONDS, less any already cancelled."""
    batch = [jobs.get()]
    gather_until = time.monotonic() + GATHER_SECONDS
    while len(batch) < max_batch_size:
        try:
            batch.append(jobs.get(timeout=max(0.0, gather_until - time.monotonic())))
        except queue.Empty:
            break
    return [job for job in batch if job is not None and not job.cancelled.is_set()]


def decode_batch(
    model: Transformer, tokenizer: Tokenizer, decode_step, batch: list[Job], stopping: threading.Event
) -> None:
    device = model.embed_tokens.weight.device
    for job in batch:
        job.stream = TextStream(tokenizer)
        job.generator = torch.Generator(device=device)
        if job.seed is None:
            job.generator.seed()
        else:
            job.generator.manual_seed(job.seed)

    def sample_rows(logits: Tensor) -> Tensor:
        # Row by row, each with its own settings and generator: a seeded answer does not depend on its neighbours.
        tokens = torch.cat(
            [sample(logits[i : i + 1], job.temperature, job.top_p, 0, job.generator) for i, job in enumerate(batch)]
        )
        for i, job in enumerate(batch):
            if job.logprobs is not None and not job.done:
                job.scores = logprobs_of(logits[i : i + 1], tokens[i : i + 1], job.logprobs)
        return tokens

    def echo_prompts(logits: Tensor) -> None:
        for i, job in enumerate(batch):
            if job.echo is not None:
                echo_prompt(job, logits[i, logits.shape[1] - len(job.prompt_ids) :], tokenizer)

    def on_token(tokens: list[int]) -> list[bool]:
        if stopping.is_set():
            return [True] * len(batch)
        return [advance(job, token, tokenizer) for job, token in zip(batch, tokens, strict=True)]

    generate_ids(
        model,
        [job.prompt_ids for job in batch],
        max(job.max_tokens for job in batch),
        tokenizer.eos_id,
        on_token=on_token,
        decode_step=decode_step,
        sample_next=sample_rows,
        on_prompt_logits=echo_prompts if any(job.echo is not None for job in batch) else None,
    )


def echo_prompt(job: Job, logits: Tensor, tokenizer: Tokenizer) -> None:
    """Starts job's choice with its prompt, from the prompt's logits (len(prompt_ids), vocab): its text, and with
    logprobs wanted its tokens, each scored at the position before it. An answer of no tokens ends there."""
    tokens = []
    if job.logprobs is not None:
        ids = job.prompt_ids
        scores = logprobs_of(logits[:-1], torch.tensor(ids[1:], device=logits.device), job.logprobs)
        tokens = prompt_token_logprobs(tokenizer, ids, *scores)
    job.offset = len(job.echo)
    job.events.put(("text", job.index, job.echo, tokens))
    if job.max_tokens == 0:
        end(job, "length")


def advance(job: Job, token: int, tokenizer: Tokenizer) -> bool:
    """Takes the next token of job's answer; True once the answer is over."""
    if job.done:
        return True
    if job.cancelled.is_set():  # nobody reads the answer any more
        job.done = True
        return True
    if token == tokenizer.eos_id:
        if add_text(job, job.stream.finish()):
            return True
        keep_logprobs(job, token, tokenizer)
        return end(job, "stop")
    keep_logprobs(job, token, tokenizer)
    job.n_tokens += 1
    if add_text(job, job.stream.add(token)):
        return True
    if job.n_tokens >= job.max_tokens or time.monotonic() >= job.deadline:
        return add_text(job, job.stream.finish()) or end(job, "length")
    return False


def add_text(job: Job, new_text: str) -> bool:
    """Adds text to job's answer and hands on what is final; True if a stop string has ended the answer there."""
    job.text += new_text
    cut = min((i for stop in job.stop if (i := job.text.find(stop)) >= 0), default=-1)
    if cut >= 0:
        job.text = job.text[:cut]
        job.tokens = [token for token in job.tokens if token.offset < job.offset + cut]
        return end(job, "stop")
    # An ending that may be the start of a stop string waits for the next token, so none is ever shown in part.
    held = max((k for stop in job.stop for k in range(1, len(stop)) if job.text.endswith(stop[:k])), default=0)
    send_text(job, len(job.text) - held)
    return False


def send_text(job: Job, upto: int, final: bool = False) -> None:
    """Hands on the text up to upto, with the tokens whose text starts before there (final: all that are left)."""
    n_tokens = job.tokens_sent
    while n_tokens < len(job.tokens) and (final or job.tokens[n_tokens].offset < job.offset + upto):
        n_tokens += 1
    if upto > job.sent or n_tokens > job.tokens_sent:
        job.events.put(("text", job.index, job.text[job.sent : upto], job.tokens[job.tokens_sent : n_tokens]))
        job.sent, job.tokens_sent = upto, n_tokens


def end(job: Job, finish_reason: str) -> bool:
    send_text(job, len(job.text), final=True)
    job.events.put(("end", job.index, finish_reason))
    job.done = True
    return True


# ---------------------------------------------------------------------------------------------------------
# Logprobs: log_softmax of the logits before temperature, in float32, as OpenAI and vLLM give them


@dataclass
class TokenLogprob:
    """A token of a choice: its text as OpenAI shows it (see token_string), its logprob and the most likely
    tokens in its place, as (text, bytes, logprob); both None for a prompt's first token, which nothing
    predicts. offset: where its text starts in the choice's text."""

    token: str
    bytes: list[int] | None
    logprob: float | None
    top: list[tuple[str, list[int] | None, float]] | None
    offset: int


def logprobs_of(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """From logits (N, vocab): the logprob of each row's token (N,), and the k most likely tokens (N, k) with
    their logprobs (N, k)."""
    logprobs = logits.float().log_softmax(dim=-1)
    top = logprobs.topk(k, dim=-1)
    return logprobs.gather(-1, tokens[:, None]).squeeze(-1), top.indices, top.values


def token_string(tokenizer: Tokenizer, token: int, at_start: bool) -> tuple[str, list[int] | None]:
    """A token's text as decoding spells it out there (Tokenizer.token_bytes), and its UTF-8 bytes. A byte-fallback
    piece's lone byte reads as an escape ("\\xe2"); a token that is no text (BOS, EOS, [PAD]) shows its piece,
    with no bytes."""
    raw = tokenizer.token_bytes(token, at_start)
    if raw is None:
        piece = PAD_PIECE if token == tokenizer.pad_id else ""  # past SentencePiece's pieces
        return (tokenizer.sp.IdToPiece(token) if token < tokenizer.n_words else piece), None
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def token_logprob(
    tokenizer: Tokenizer, token: int, at_start: bool, offset: int, scores: tuple[float, list[int], list[float]] | None
) -> TokenLogprob:
    """token's TokenLogprob from its scores (its logprob, the top tokens and their logprobs), None: unscored."""
    text, raw = token_string(tokenizer, token, at_start)
    if scores is None:
        return TokenLogprob(text, raw, None, None, offset)
    logprob, top_ids, top_logprobs = scores
    top = [(*token_string(tokenizer, t, at_start), value) for t, value in zip(top_ids, top_logprobs, strict=True)]
    return TokenLogprob(text, raw, logprob, top, offset)


def prompt_token_logprobs(
    tokenizer: Tokenizer, ids: list[int], logprobs: Tensor, top_ids: Tensor, top_logprobs: Tensor
) -> list[TokenLogprob]:
    """A prompt's tokens, the first unscored and token j + 1 scored by logprobs_of's row j, with the offsets of
    their text in the decoded prompt (a character that byte pieces spell starts at its first byte's)."""
    scores = [None, *zip(logprobs.tolist(), top_ids.tolist(), top_logprobs.tolist(), strict=True)]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens, offset, at_start = [], 0, True
    for token, token_scores in zip(ids, scores, strict=True):
        tokens.append(token_logprob(tokenizer, token, at_start, offset, token_scores))
        raw = tokenizer.token_bytes(token, at_start)
        if raw is not None:
            offset += len(decoder.decode(raw))
            at_start = False
    return tokens


def keep_logprobs(job: Job, token: int, tokenizer: Tokenizer) -> None:
    """Adds the token that advance takes to job's tokens, with the scores sample_rows left for it, if any."""
    if job.scores is None:
        return
    (logprob,), (top_ids,), (top_logprobs,) = (scores.tolist() for scores in job.scores)
    at_start = not job.stream.ids  # the answer's text is decoded on its own: its first leading space is dropped
    job.tokens.append(
        token_logprob(tokenizer, token, at_start, job.offset + len(job.text), (logprob, top_ids, top_logprobs))
    )
    job.scores = None


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": [{"token": text, "logprob": value, "bytes": raw} for text, raw, value in t.top],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The legacy completions shape: lists by token, top_logprobs a {token: logprob} dict each (with the chosen
    token's, as OpenAI gives it), None for a prompt's first token."""
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            None if t.top is None else {text: value for text, _, value in t.top} | {t.token: t.logprob} for t in tokens
        ],
        "text_offset": [t.offset for t in tokens],
    }


# ---------------------------------------------------------------------------------------------------------
# Requests


def get_field(body: dict, name: str, types: tuple[type, ...], expected: str, default=None):
    """body[name] if it has one of types, else default if it is absent or null (as OpenAI reads null)."""
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but true is no number in JSON.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise RequestError(f"'{name}' must be {expected}, got {json.dumps(value)[:100]}")
    return value


def completion_prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completions request: texts, or token ids, taken as they are (no BOS added), as OpenAI
    and vLLM take them and lm-evaluation-harness sends them."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or is_token_ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or is_token_ids(p) for p in prompts):
        raise RequestError(
            "'prompt' must be a string or a non-empty list of strings, or token ids: a non-empty list of integers "
            "or a list of such lists"
        )
    for i, ids in enumerate(prompts):
        outside = [token for token in ids if not 0 <= token < vocab_size] if isinstance(ids, list) else []
        if outside:
            raise RequestError(f"'prompt'[{i}]: token id {outside[0]} is not in the vocabulary [0, {vocab_size})")
    return prompts


def is_token_ids(value) -> bool:
    return bool(value) and isinstance(value, list) and all(type(token) is int for token in value)


def chat_prompt(body: dict) -> str:
    """The Alpaca prompt for a conversation: its last user message is the instruction, and when the message
    before that is the user's too, the two are the instruction and its input."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"'messages'[{i}] must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"'messages'[{i}]: 'content' must be a string")
    if messages[-1]["role"] != "user":
        raise RequestError(f"the last message must be the user's (the instruction), not the {messages[-1]['role']}'s")
    if len(messages) >= 2 and messages[-2]["role"] == "user":
        return format_prompt(messages[-2]["content"], messages[-1]["content"])
    return format_prompt(messages[-1]["content"])


def make_jobs(body: dict, prompts: list[str | list[int]], is_chat: bool, server: "Server") -> list[Job]:
    """A Job for each prompt (a text, or token ids), with the request's settings checked; raises RequestError on
    a bad field."""
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise RequestError(f"'{name}' must be 1: one answer per prompt")
    for name in ("suffix", "tools", "functions", "echo" if is_chat else "top_logprobs"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported" + " in chat" * is_chat)
    logprobs, echo = chat_logprobs_field(body) if is_chat else completion_logprobs_field(body)
    least = 0 if echo else 1  # 0 new tokens: the prompt's logprobs alone
    max_tokens = get_field(body, "max_tokens", (int,), f"an integer >= {least}")
    if is_chat:
        max_tokens = get_field(body, "max_completion_tokens", (int,), "an integer >= 1", max_tokens)
    elif max_tokens is None:
        max_tokens = COMPLETION_MAX_TOKENS
    if max_tokens is not None and max_tokens < least:
        raise RequestError(f"'max_tokens' must be an integer >= {least}, got {max_tokens}")
    temperature = get_field(body, "temperature", (int, float), "a number in [0, 2]", 1.0)
    if not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number in [0, 2], got {temperature}")
    top_p = get_field(body, "top_p", (int, float), "a number in (0, 1]", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be a number in (0, 1], got {top_p}")
    seed = get_field(body, "seed", (int,), "an integer in [0, 2**64)")
    if seed is not None and not 0 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise RequestError(f"'seed' must be an integer in [0, 2**64), got {seed}")
    stop = get_field(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of non-empty strings")

    tokenizer, max_seq_len = server.tokenizer, server.max_seq_len
    prompt_ids = [prompt if isinstance(prompt, list) else tokenizer.encode(prompt, bos=True) for prompt in prompts]
    try:
        check_prompt_lengths(prompt_ids, max_seq_len)
    except ValueError as e:
        raise RequestError(str(e)) from None
    events = queue.Queue()
    deadline = time.monotonic() + server.request_timeout
    max_tokens = max_seq_len if max_tokens is None else max_tokens
    return [
        Job(i, ids, min(max_tokens, max_seq_len - len(ids)), float(temperature), float(top_p), seed, stop, logprobs,
            (tokenizer.decode(prompt) if isinstance(prompt, list) else prompt) if echo else None, deadline, events)
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True))
    ]  # fmt: skip


def chat_logprobs_field(body: dict) -> tuple[int | None, bool]:
    """(most likely tokens to give with each token's logprob, None: no logprobs; echo, which chat has not)."""
    logprobs = get_field(body, "logprobs", (bool,), "true or false", False)
    top_logprobs = get_field(body, "top_logprobs", (int,), "an integer in [0, 20]")
    if top_logprobs is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise RequestError(f"'top_logprobs' must be an integer in [0, 20], got {top_logprobs}")
    return (top_logprobs or 0) if logprobs else None, False


def completion_logprobs_field(body: dict) -> tuple[int | None, bool]:
    """(most likely tokens to give with each token's logprob, None: no logprobs; whether to echo the prompt)."""
    logprobs = get_field(body, "logprobs", (int,), "an integer in [0, 5]")
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise RequestError(f"'logprobs' must be an integer in [0, 5], got {logprobs}")
    return logprobs, get_field(body, "echo", (bool,), "true or false", False)


# ---------------------------------------------------------------------------------------------------------
# HTTP


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a request still streaming does not hold up shutdown

    def __init__(
        self,
        address: tuple[str, int],
        model_id: str,
        tokenizer: Tokenizer,
        max_seq_len: int,
        vocab_size: int,
        timeout: float,
    ):
        self.model_id, self.tokenizer, self.max_seq_len, self.vocab_size = model_id, tokenizer, max_seq_len, vocab_size
        self.request_timeout = timeout
        self.created = int(time.time())
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.page = CHAT_PAGE.read_bytes()
        self.stopping = threading.Event()
        self.decoder: threading.Thread | None = None
        super().__init__(address, Handler)  # last: a failed bind calls server_close, which needs the above

    def start_decoding(self, model: Transformer, decode_step, max_batch_size: int) -> None:
        args = (model, self.tokenizer, decode_step, self.jobs, max_batch_size, self.stopping)
        self.decoder = threading.Thread(target=decode_forever, args=args, daemon=True)
        self.decoder.start()

    def server_close(self) -> None:
        """Closes the socket and ends the decoding thread after its current step: a thread left inside torch
        when the interpreter exits can abort the process."""
        super().server_close()
        if self.decoder is not None:
            self.stopping.set()
            self.jobs.put(None)
            self.decoder.join()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive for the non-streamed answers, which carry a Content-Length
    timeout = 60  # seconds a client may stall mid-request, or stop reading a stream, before its thread gives up
    error_types = {404: "not_found_error", 405: "method_not_allowed", 413: "request_too_large"}

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        if route == "/":
            self.send_body(200, self.server.page, "text/html; charset=utf-8")
        elif route == "/health":
            self.send_json(200, {"status": "ok"})
        elif route == "/v1/models":
            card = {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "local"}
            self.send_json(200, {"object": "list", "data": [card]})
        else:
            self.send_route_error(route)

    def do_POST(self) -> None:
        route = self.path.split("?")[0]
        if route not in ("/v1/completions", "/v1/chat/completions"):
            self.send_route_error(route)
            return
        is_chat = route == "/v1/chat/completions"
        try:
            body = self.read_json()
            prompts = [chat_prompt(body)] if is_chat else completion_prompts(body, self.server.vocab_size)
            jobs = make_jobs(body, prompts, is_chat, self.server)
            stream = get_field(body, "stream", (bool,), "true or false", False)
            stream_options = get_field(body, "stream_options", (dict,), "an object", {})
            include_usage = get_field(stream_options, "include_usage", (bool,), "true or false", False)
        except RequestError as e:
            self.send_error(e.status, str(e))
            return
        for job in jobs:
            self.server.jobs.put(job)
        try:
            if stream:
                self.stream_answers(jobs, is_chat, include_usage)
            else:
                self.send_answers(jobs, is_chat)
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            for job in jobs:  # frees the rows of a client that left before its answers ended
                job.cancelled.set()

    def do_PUT(self) -> None:
        self.send_route_error(self.path.split("?")[0])

    do_DELETE = do_PATCH = do_PUT

    def send_route_error(self, route: str) -> None:
        if route in ROUTES:
            self.send_error(405, f"{route} takes {ROUTES[route]}, not {self.command}")
        else:
            self.send_error(404, f"no route {route}: try {', '.join(ROUTES)}")

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a JSON body with a Content-Length header is required", 411)
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}", 413)
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def events(self, jobs: list[Job]):
        """The jobs' events as they come, until every job has ended; raises ConnectionError if the client has
        gone, which is checked between events."""
        events, open_jobs = jobs[0].events, len(jobs)
        while open_jobs:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if self.client_gone():
                raise ConnectionError("the client closed the connection")
            if event is not None:
                open_jobs -= event[0] in ("end", "error")
                yield event

    def client_gone(self) -> bool:
        """True once the client has closed its end: the socket reads as ready, with nothing to read."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def send_answers(self, jobs: list[Job], is_chat: bool) -> None:
        texts = [""] * len(jobs)
        tokens = [[] for _ in jobs]
        choices = [{} for _ in jobs]
        for kind, index, *payload in self.events(jobs):
            if kind == "error":
                self.send_error(500, payload[0])
                return
            if kind == "text":
                texts[index] += payload[0]
                tokens[index] += payload[1]
            else:
                (finish_reason,) = payload
                if is_chat:
                    choices[index] = {"index": index, "message": {"role": "assistant", "content": texts[index]}}
                else:
                    choices[index] = {"index": index, "text": texts[index]}
                logprobs = logprobs_field(jobs[index], tokens[index], is_chat)
                choices[index] |= {"logprobs": logprobs, "finish_reason": finish_reason}
        response = self.response_head(is_chat, streamed=False) | {"choices": choices, "usage": usage(jobs)}
        self.send_json(200, response)

    def stream_answers(self, jobs: list[Job], is_chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends where the connection does
        self.end_headers()
        self.close_connection = True
        head = self.response_head(is_chat, streamed=True)
        if is_chat:
            self.send_event(head | {"choices": [chunk_choice(True, job.index, None, role=True) for job in jobs]})
        for kind, index, *payload in self.events(jobs):
            if kind == "error":
                self.send_event({"error": {"message": payload[0], "type": "server_error"}})
                return
            if kind == "text":
                text, tokens = payload
                logprobs = logprobs_field(jobs[index], tokens, is_chat)
                self.send_event(head | {"choices": [chunk_choice(is_chat, index, text, logprobs=logprobs)]})
            else:
                self.send_event(head | {"choices": [chunk_choice(is_chat, index, "", finish_reason=payload[0])]})
        if include_usage:
            self.send_event(head | {"choices": [], "usage": usage(jobs)})
        self.wfile.write(b"data: [DONE]\n\n")

    def response_head(self, is_chat: bool, streamed: bool) -> dict:
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if is_chat else "text_completion"
        prefix = "chatcmpl-" if is_chat else "cmpl-"
        return {
            "id": prefix + uuid.uuid4().hex,
            "object": kind,
            "created": int(time.time()),
            "model": self.server.model_id,
        }

    def send_event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def send_json(self, status: int, obj: dict) -> None:
        self.send_body(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error as OpenAI's JSON error object, also those http.server sends itself (a malformed request).
        The connection ends with it: after a malformed request, what follows on it cannot be trusted."""
        self.close_connection = True
        error_type = self.error_types.get(code, "server_error" if code >= 500 else "invalid_request_error")
        self.send_json(code, {"error": {"message": message or HTTPStatus(code).phrase, "type": error_type}})


def chunk_choice(
    is_chat: bool,
    index: int,
    text: str | None,
    finish_reason: str | None = None,
    role: bool = False,
    logprobs: dict | None = None,
) -> dict:
    if not is_chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def logprobs_field(job: Job, tokens: list[TokenLogprob], is_chat: bool) -> dict | None:
    """A choice's (or chunk's) logprobs: None unless the request asked for them."""
    if job.logprobs is None:
        return None
    return chat_logprobs(tokens) if is_chat else completion_logprobs(tokens)


def usage(jobs: list[Job]) -> dict:
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    completion_tokens = sum(job.n_tokens for job in jobs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free one)")
    parser.add_argument("--max_batch_size", type=int, default=8, help="answers decoded together (default: 8)")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds a request may take; its answer ends there (default: 600)"
    )
    # generate.load_for_decoding reads --compile, which is not offered: every new batch size would compile again.
    parser.set_defaults(compile=False)

    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    args.model_path = model_path_or_default(args.model_path)
    return args


def build_server(args: argparse.Namespace) -> Server:
    """Binds the server, loads the model as generate.py does and starts the decoding thread; serve_forever()
    then serves, and server_close() ends it all."""
    model_args, tokenizer = load_tokenizer(args)
    model_id = os.path.basename(os.path.normpath(args.model_path))
    try:  # before the slow load, so that a port in use fails fast
        server = Server(
            (args.host, args.port), model_id, tokenizer, model_args.max_seq_len, model_args.vocab_size, args.timeout
        )
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    try:
        model, decode_step = load_for_decoding(args)
    except BaseException:
        server.server_close()
        raise
    server.start_decoding(model, decode_step, args.max_batch_size)
    return server


def main(argv: list[str] | None = None) -> None:
    try:
        server = build_server(parse_args(argv))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    host, port = server.server_address[:2]
    print(f"serving {server.model_id} on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

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

One thread owns the model and runs the decoding engine (engine.py), which schedules per step: a request joins the
running batch at the next step (its prompt prefilled a chunk at a time beside the rows already decoding) and
leaves it when its answer ends, so a short answer never waits for a long one. Each request's thread makes a Job
per prompt, submits their engine Requests and reads the answers back from the jobs' own queue; each row keeps its
own temperature, top_p, seed, max_tokens and stop strings, so an answer does not depend on its neighbours. Past
--max_batch_size rows and --max_queue waiting, a request gets 429 with Retry-After at once. A job whose client has
gone away leaves at the next step; one whose time is up at its next token. --api_key guards /v1/*.
"""

import argparse
import codecs
import hmac
import ipaddress
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
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from torch import Tensor

from cli import ArgumentParser, check_ranges
from data import format_prompt
from engine import Engine, QueueFull, Request, TextStream, check_prompt_lengths
from loading import add_model_flags, load_for_decoding, load_tokenizer, model_path_or_default
from tokenizer import PAD_PIECE, Tokenizer

CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_SECONDS = 1  # what a 429 asks a client to wait: rows free up as answers end, a step at a time
ROUTES = {"/": "GET", "/health": "GET", "/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat answers may fill the context


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One answer to produce: the engine's Request, and what the HTTP side makes of its tokens. The request thread
    fills the first fields; the engine's thread, through the request's callbacks, the rest, and reports to
    `events`: ("text", index, text, tokens) as the answer grows (tokens: the TokenLogprobs of the tokens whose
    text starts in it, with logprobs wanted), then ("end", index, finish_reason), or ("error", index, message)."""

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
    request: Request | None = None
    stream: TextStream | None = None
    text: str = ""
    sent: int = 0  # characters of text already put on events
    offset: int = 0  # characters before the answer in the choice's text: the echoed prompt's
    tokens: list["TokenLogprob"] = field(default_factory=list)  # the answer's tokens, with logprobs wanted
    tokens_sent: int = 0
    scores: tuple[Tensor, Tensor, Tensor] | None = None  # logprobs_of the token just picked, for advance
    prompt_scores: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # the echo's, chunk by chunk
    prompt_scored: int = 0  # prompt positions whose logits have come
    n_tokens: int = 0
    done: bool = False


# ---------------------------------------------------------------------------------------------------------
# The engine's callbacks, in its thread


def engine_request(job: Job, tokenizer: Tokenizer) -> Request:
    """The Request that decodes job's answer. An echo starts the choice with the prompt's text: at once, or with
    logprobs wanted once the prompt's logits have scored its tokens (score_prompt)."""
    job.stream = TextStream(tokenizer)
    if job.echo is not None:
        job.offset = len(job.echo)
        if job.logprobs is None:
            job.events.put(("text", job.index, job.echo, []))
    scored_echo = job.echo is not None and job.logprobs is not None
    return Request(
        job.prompt_ids, job.max_tokens, job.temperature, job.top_p, 0, job.seed,
        on_token=partial(take_token, job, tokenizer), logits=job.logprobs is not None,
        on_prompt_logits=partial(score_prompt, job, tokenizer) if scored_echo else None,
        on_end=partial(finish, job), cancelled=job.cancelled,
    )  # fmt: skip


def take_token(job: Job, tokenizer: Tokenizer, token: int, logits: Tensor | None) -> bool:
    """The next token of job's answer, EOS included, with the logits it was drawn from if logprobs are wanted;
    True once the answer is over."""
    if logits is not None:
        job.scores = logprobs_of(logits[None], torch.tensor([token], device=logits.device), job.logprobs)
    return advance(job, token, tokenizer)


def score_prompt(job: Job, tokenizer: Tokenizer, logits: Tensor) -> None:
    """Scores the echoed prompt's tokens a chunk of its positions at a time (logits (chunk, vocab)), each token by
    the logits at the position before it; once the whole prompt has run, starts the choice with it."""
    start = job.prompt_scored
    predicted = torch.tensor(job.prompt_ids[start + 1 : start + 1 + len(logits)], device=logits.device)
    job.prompt_scores.append(logprobs_of(logits[: len(predicted)], predicted, job.logprobs))
    job.prompt_scored += len(logits)
    if job.prompt_scored == len(job.prompt_ids):  # (the last position predicts the answer, not the prompt)
        scores = [torch.cat(parts) for parts in zip(*job.prompt_scores, strict=True)]
        job.events.put(("text", job.index, job.echo, prompt_token_logprobs(tokenizer, job.prompt_ids, *scores)))


def finish(job: Job, request: Request) -> None:
    """The end of job's request, if advance has not ended the answer itself: the engine has failed it, the client
    has gone, or max_tokens has run out without a token (max_tokens 0: the prompt's logprobs alone)."""
    if job.done:
        return
    job.done = True
    if request.finish_reason == "error":
        job.events.put(("error", job.index, f"decoding failed: {request.error}"))
    elif request.finish_reason != "cancelled":
        add_text(job, job.stream.finish()) or end(job, "stop" if request.finish_reason == "stop" else "length")


def advance(job: Job, token: int, tokenizer: Tokenizer) -> bool:
    """Takes the next token of job's answer; True once the answer is over."""
    if job.done:
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
    jobs = [
        Job(i, ids, min(max_tokens, max_seq_len - len(ids)), float(temperature), float(top_p), seed, stop, logprobs,
            (tokenizer.decode(prompt) if isinstance(prompt, list) else prompt) if echo else None, deadline, events)
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids, strict=True))
    ]  # fmt: skip
    for job in jobs:
        job.request = engine_request(job, tokenizer)
    return jobs


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
    # The listen backlog (socketserver's default is 5): a burst of clients waits to be accepted, and answered, if
    # need be with a 429, instead of having its connections reset. The kernel caps it at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        model_id: str,
        tokenizer: Tokenizer,
        max_seq_len: int,
        vocab_size: int,
        timeout: float,
        api_key: str | None = None,
    ):
        self.model_id, self.tokenizer, self.max_seq_len, self.vocab_size = model_id, tokenizer, max_seq_len, vocab_size
        self.request_timeout, self.api_key = timeout, api_key
        self.created = int(time.time())
        self.page = CHAT_PAGE.read_bytes()
        self.engine: Engine | None = None
        super().__init__(address, Handler)  # last: a failed bind calls server_close, which needs the above

    def start_decoding(self, engine: Engine) -> None:
        self.engine = engine
        engine.start()

    def server_close(self) -> None:
        """Closes the socket and ends the engine's thread."""
        super().server_close()
        if self.engine is not None:
            self.engine.stop()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive for the non-streamed answers, which carry a Content-Length
    timeout = 60  # seconds a client may stall mid-request, or stop reading a stream, before its thread gives up
    # OpenAI's error types and codes where it has its own; the rest as other servers name them.
    error_types = {404: "not_found_error", 405: "method_not_allowed", 413: "request_too_large", 429: "requests"}
    error_codes = {401: "invalid_api_key", 429: "rate_limit_exceeded"}

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        if not self.authorized(route):
            return
        if route == "/":
            self.send_body(200, self.server.page, "text/html; charset=utf-8")
        elif route == "/health":
            self.send_json(200, {"status": "ok"})
        elif route == "/v1/models":
            card = {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "local"}
            self.send_json(200, {"object": "list", "data": [card]})
        else:
            self.send_route_error(route)

    def authorized(self, route: str) -> bool:
        """With an API key, /v1/* asks for `Authorization: Bearer KEY`, as OpenAI and vLLM do; answers 401 if not."""
        key = self.server.api_key
        if key is None or not route.startswith("/v1/"):
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        what = "an incorrect API key" if given else "no API key"
        self.send_error(401, f"{what} was given: send the header 'Authorization: Bearer KEY'")
        return False

    def do_POST(self) -> None:
        route = self.path.split("?")[0]
        if not self.authorized(route):
            return
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
        try:
            self.server.engine.submit([job.request for job in jobs])
        except QueueFull as e:
            message = f"the server is busy ({e}): retry after {RETRY_AFTER_SECONDS} s"
            self.send_error(429, message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            return
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
        route = self.path.split("?")[0]
        if self.authorized(route):
            self.send_route_error(route)

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

    def send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def send_body(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """Every error as OpenAI's JSON error object, also those http.server sends itself (a malformed request).
        The connection ends with it: after a malformed request, what follows on it cannot be trusted."""
        self.close_connection = True
        error = {"message": message or HTTPStatus(code).phrase}
        error["type"] = self.error_types.get(code, "server_error" if code >= 500 else "invalid_request_error")
        if code in self.error_codes:
            error["code"] = self.error_codes[code]
        self.send_json(code, {"error": error}, headers)


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
    parser.add_argument(
        "--max_batch_size", type=int, default=8,
        help="answers decoded together, each in a row of the KV cache, which is allocated for them all at start "
        "(default: 8)",
    )  # fmt: skip
    parser.add_argument(
        "--max_queue", type=int, default=64,
        help="answers that may wait for a row; past them, a request is refused at once with 429 and Retry-After "
        "(default: 64)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds a request may take; its answer ends there (default: 600)"
    )
    parser.add_argument(
        "--api_key", default=os.environ.get("ALPACA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $ALPACA_API_KEY; none: no key asked). The chat "
        "page asks for it once and keeps it in the browser",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="compile the decoding steps for batch sizes 1, 2, 4, ... up to --max_batch_size, in a process of "
        "their own, while the server decodes uncompiled; each is used once it is ready. The first time takes "
        "minutes a batch size; they are kept on disk (TORCHINDUCTOR_CACHE_DIR), and a later start loads them in "
        "seconds",
    )  # fmt: skip

    args = parser.parse_args(argv)
    check_ranges(args, {"max_batch_size": ">= 1", "max_queue": ">= 0", "timeout": "> 0"})
    if args.api_key == "":
        raise ValueError("--api_key is empty (or $ALPACA_API_KEY is set to nothing): give a key, or none")
    args.model_path = model_path_or_default(args.model_path)
    return args


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def build_server(args: argparse.Namespace) -> Server:
    """Binds the server, loads the model as generate.py does and starts the decoding engine's thread;
    serve_forever() then serves, and server_close() ends it all."""
    model_args, tokenizer = load_tokenizer(args)
    model_id = os.path.basename(os.path.normpath(args.model_path))
    try:  # before the slow load, so that a port in use fails fast
        server = Server(
            (args.host, args.port), model_id, tokenizer, model_args.max_seq_len, model_args.vocab_size, args.timeout,
            args.api_key,
        )  # fmt: skip
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    try:
        model, compiled = load_for_decoding(args, in_background=True)
        engine = Engine(model, tokenizer.eos_id, args.max_batch_size, args.max_queue, compiled=compiled)
    except BaseException:
        server.server_close()
        raise
    server.start_decoding(engine)
    return server


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        server = build_server(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    host, port = server.server_address[:2]
    print(f"serving {server.model_id} on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    engine = server.engine
    rows, per_row = engine.max_batch_size, engine.cache_bytes_per_row()
    print(f"KV cache: {rows} rows of {engine.max_len} positions, {per_row / 2**20:.1f} MiB a row, "
          f"{rows * per_row / 2**30:.2f} GiB in all", file=sys.stderr, flush=True)  # fmt: skip
    if args.api_key is None and not is_loopback(args.host):
        print(f"warning: serving on {args.host} with no --api_key: anyone who can reach it can use the model",
              file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

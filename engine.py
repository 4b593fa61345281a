"""The decoding engine: requests scheduled step by step over one preallocated KV cache (continuous batching), each
with its own sampling settings; and the batch API on top of it, `generate_ids` and `generate`.

At every step, finished and cancelled requests leave and waiting ones take their places, up to max_batch_size.
A joining prompt is prefilled a chunk at a time between the decoding steps of the rows already running, each chunk
sized to cost about one decoding step, so a long prompt delays them by a step, not by its whole prefill. Every
request has a cache row of its own and writes its tokens at its own positions there: no padding to the longest
prompt, and no request waits for another to end.

    engine = Engine(model, tokenizer.eos_id, max_batch_size=8)
    engine.start()                                            # a thread of its own owns the model
    engine.submit([request := Request(prompt_ids, max_new_tokens=64)])   # from any thread
    request.ended.wait()                                      # request.output_ids, request.finish_reason

`generate_ids(model, prompt_ids, ...)` runs a list of prompts to their answers in the calling thread.
"""

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from model import Transformer, attention_dtype
from tokenizer import Tokenizer

SMALLEST_CHUNK = 8  # fewer tokens a forward would waste the prefill's matrix products on too few rows
IDLE_PREFILL_TOKENS = 2048  # prompt tokens in one forward when no row is decoding: bounds its activations
NUCLEUS_CANDIDATES = 64  # the most likely tokens sorted first for top_p (see nucleus)
GATHER_SECONDS = 0.02  # an idle engine waits this long for requests sent at the same moment, to prefill them together


class QueueFull(Exception):
    """The engine's rows and queue are taken: the request was not queued."""


class CompiledSteps(Protocol):
    """Compiled decoding steps by batch size (optimize.CompiledSteps)."""

    def prepare(self, rows: int, slots: int) -> None:
        """The engine's KV cache has this shape: the steps to come are for it."""

    def get(self, batch_size: int) -> tuple[int, Callable[..., Tensor]] | None:
        """(the step's batch size, >= batch_size; the step), or None to decode uncompiled."""


@dataclass(eq=False)
class Request:
    """One answer to produce. The caller fills the settings and callbacks; the engine, from its own thread, fills
    the rest, calls on_token with each new token (EOS too, though output_ids leave it out), then on_end once.
    max_new_tokens 0 runs the prompt alone, for on_prompt_logits."""

    prompt_ids: list[int]  # BOS included
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Each new token, with the logits it was drawn from (vocab,) if `logits` is set; True ends the answer there.
    on_token: Callable[[int, Tensor | None], bool | None] | None = None
    logits: bool = False
    # The logits at every prompt position, a chunk at a time: (chunk length, vocab).
    on_prompt_logits: Callable[[Tensor], None] | None = None
    on_end: Callable[["Request"], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)  # set after on_end
    # The engine's:
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length", "halted" (by on_token), "cancelled" or "error"
    error: str | None = None
    row: int = -1  # its row of the KV cache
    length: int = 0  # tokens it has in its cache row
    generator: torch.Generator | None = None


def sample(logits: Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator) -> Tensor:
    """The next token (B,) from last-position logits (B, vocab): the argmax at temperature 0, else a draw from
    the softmax at that temperature, cut to the top_k most likely tokens (0: no cut) and then to the nucleus,
    the fewest most likely tokens whose probability reaches top_p (1: no cut)."""
    if temperature == 0:
        return logits.max(dim=-1).indices  # the first maximum, like argmax, which is slower in bf16 on the CPU
    logits = logits.float() / temperature
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        probs = nucleus(probs, top_p)
    # Inverse transform sampling: torch.multinomial draws a random number per token of the vocabulary, which on the
    # CPU costs more than a small model's decoding step.
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs (B, vocab) with every token outside the nucleus set to 0: a token stays when the more likely tokens
    before it hold less than top_p, so the most likely always stays. Sorting the whole vocabulary costs more than
    a small model's decoding step, and a trained model's nucleus is nearly always among its few most likely
    tokens: those are sorted first, and the whole vocabulary only when the nucleus may reach past them."""
    top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # sorted, most likely first
    before = top.cumsum(dim=-1) - top
    if not bool((before[:, -1] >= top_p).all()):  # the last candidate may be in: so may later tokens
        top, order = probs.sort(dim=-1, descending=True)
        before = top.cumsum(dim=-1) - top
    return torch.zeros_like(probs).scatter(-1, order, top.masked_fill(before >= top_p, 0.0))


def check_prompt_lengths(prompt_ids: list[list[int]], max_seq_len: int) -> None:
    """Refuses prompts that leave no room for an answer in the model's context. Cutting them to fit would drop
    the start of an Alpaca prompt, which holds the template and the instruction, so the answer would be noise."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= max_seq_len:
            raise ValueError(
                f"prompt {i + 1} is {len(ids)} tokens long, but the model's context is {max_seq_len} tokens "
                "and the answer needs at least one: shorten the prompt"
            )


class Engine:
    """Decodes the requests submitted to it, step by step, over a KV cache of max_batch_size rows of
    `max_len` positions (default: the model's context) allocated once, so that a request never runs out of
    memory mid-answer: past max_batch_size rows, requests wait in a queue of at most max_queue (None: no
    bound). `compiled` gives compiled decoding steps; prompts always run uncompiled. prefill_chunk fixes the
    prompt tokens prefilled beside decoding rows (default: as many as cost about one decoding step, timed).
    The engine owns the model's KV cache: another engine, or generate_ids, on the same model would replace it."""

    def __init__(
        self,
        model: Transformer,
        eos_id: int,
        max_batch_size: int,
        max_queue: int | None = None,
        max_len: int | None = None,
        compiled: CompiledSteps | None = None,
        prefill_chunk: int | None = None,
    ):
        self.model, self.eos_id, self.max_batch_size, self.max_queue = model, eos_id, max_batch_size, max_queue
        self.max_len = min(max_len or model.model_args.max_seq_len, model.model_args.max_seq_len)
        self.scratch_slot = self.max_len  # where padding tokens write: no real token ever reads it
        try:
            model.setup_cache(max_batch_size, self.max_len + 1)
        except (RuntimeError, MemoryError) as e:  # out of memory: CUDA's is a RuntimeError, the CPU's too
            a, element = model.model_args, attention_dtype(model.embed_tokens.weight).itemsize
            size = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (self.max_len + 1) * element * max_batch_size
            raise ValueError(
                f"the KV cache ({max_batch_size} rows of {self.max_len + 1} positions, {size / 2**30:.1f} GiB) "
                f"does not fit ({type(e).__name__}): fewer rows (max_batch_size) or a smaller dtype"
            ) from None
        if compiled is not None:
            compiled.prepare(max_batch_size, self.max_len + 1)
        self.device = model.embed_tokens.weight.device
        self.compiled, self.prefill_chunk = compiled, prefill_chunk
        self.lock = threading.Condition()  # guards waiting and taken_rows, which submit() reads from other threads
        self.waiting: deque[Request] = deque()
        self.taken_rows = 0
        self.decoding: list[Request] = []  # decoding[i] has cache row i: a step reads rows 0..B-1, a view
        self.prefilling: list[Request] = []  # first come first served, in rows from len(decoding) on
        self.free_rows = set(range(max_batch_size))
        self.step_seconds: deque[float] = deque(maxlen=8)  # the last decoding steps' times: the least counts
        self.chunk = SMALLEST_CHUNK  # prompt tokens prefilled beside decoding rows, timed to cost about a step
        self.stats = dict(prompt_tokens=0, prompt_seconds=0.0, tokens=0, decode_seconds=0.0)
        self.thread: threading.Thread | None = None
        self.stopping = False

    # -----------------------------------------------------------------------------------------------------
    # From any thread

    def submit(self, requests: list[Request]) -> None:
        """Queues the requests, all or none: QueueFull if the rows and the queue have no room for them all."""
        for request in requests:
            if len(request.prompt_ids) >= self.max_len:
                raise ValueError(
                    f"the prompt is {len(request.prompt_ids)} tokens long, but the context is {self.max_len} tokens "
                    "and the answer needs at least one"
                )
            request.max_new_tokens = min(request.max_new_tokens, self.max_len - len(request.prompt_ids))
        with self.lock:
            if self.max_queue is not None:
                room = self.max_queue + self.max_batch_size - self.taken_rows - len(self.waiting)
                if len(requests) > room:
                    raise QueueFull(f"{len(requests)} answer(s) asked, room for {max(room, 0)}")
            self.waiting.extend(requests)
            self.lock.notify()

    # -----------------------------------------------------------------------------------------------------
    # In the thread that owns the model

    def start(self) -> None:
        """Runs the engine in a thread of its own until stop(): it steps while there is work and waits for it
        otherwise."""
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Ends the engine's thread after its current step (a thread left inside torch when the interpreter exits
        can abort the process). The requests it had are left unfinished."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join()

    def run(self) -> None:
        while True:
            with self.lock:
                idle = not (self.waiting or self.decoding or self.prefilling)
                while not (self.waiting or self.decoding or self.prefilling or self.stopping):
                    self.lock.wait()
                if self.stopping:
                    return
            if idle:
                time.sleep(GATHER_SECONDS)
            try:
                self.step()
            except Exception as e:  # a bug of the engine's own: its requests fail, and it goes on
                for request in self.decoding + self.prefilling:
                    self.fail(request, e)

    def run_until_done(self) -> None:
        while self.waiting or self.decoding or self.prefilling:
            self.step()

    def step(self) -> None:
        """One round: cancelled requests leave, waiting ones take free rows, a chunk of the joining prompts is
        prefilled, and every decoding row gets its next token."""
        for request in [r for r in self.decoding + self.prefilling if r.cancelled.is_set()]:
            request.finish_reason = "cancelled"
            self.leave(request)
        self.admit()
        if self.prefilling:
            # The decoding rows ride in the prompt's forward unless a compiled step is there to decode them.
            with_decoding = bool(self.decoding) and self.compiled_step(len(self.decoding)) is None
            self.prefill(with_decoding)
            if with_decoding:
                return
        if self.decoding:
            self.decode()

    def admit(self) -> None:
        """Waiting requests take the free rows, first come first served; cancelled ones leave the queue."""
        with self.lock:
            cancelled = [request for request in self.waiting if request.cancelled.is_set()]
            if cancelled:
                self.waiting = deque(request for request in self.waiting if not request.cancelled.is_set())
            while self.waiting and self.free_rows:
                request = self.waiting.popleft()
                request.row = min(self.free_rows)
                self.free_rows.remove(request.row)
                self.taken_rows += 1
                self.prefilling.append(request)
        for request in cancelled:
            request.finish_reason = "cancelled"
            self.report_end(request)
        for request in self.prefilling:
            if request.generator is None:
                request.generator = torch.Generator(device=self.device)
                if request.seed is None:
                    request.generator.seed()
                else:
                    request.generator.manual_seed(request.seed)

    def prefill_budget(self) -> int:
        if not self.decoding:
            return IDLE_PREFILL_TOKENS
        return self.prefill_chunk or self.chunk

    def prefill(self, with_decoding: bool) -> None:
        """The next chunk of the joining prompts, first come first served, in one forward. with_decoding, the
        decoding rows' next tokens ride in the same forward, so that the weights are read once for both; the
        linear layers run on the real tokens alone (tokens_at), not on the one-token rows' padding. A prompt that
        is complete gives its first token and its request joins the decoding rows."""
        budget, pieces = self.prefill_budget(), []
        left = budget
        for request in self.prefilling:
            n = min(len(request.prompt_ids) - request.length, left)
            if n <= 0:
                break
            pieces.append((request, request.prompt_ids[request.length : request.length + n]))
            left -= n
        decoding = list(self.decoding) if with_decoding else []
        rows = [(request, [request.output_ids[-1]]) for request in decoding] + pieces
        first_row = 0 if with_decoding else len(self.decoding)  # else the rows after the decoding ones
        self.place_rows([request for request, _ in rows], first_row)
        all_logits = any(request.on_prompt_logits is not None for request, _ in pieces)
        start = time.perf_counter()
        try:
            logits = self.forward_rows(rows, first_row, all_logits)
        except Exception as e:
            if decoding:  # again apart, so that the failure fails only the rows it is in
                self.prefill(with_decoding=False)
                self.decode()
                return
            for request, _ in pieces:  # fails the requests of this forward, not the engine
                self.fail(request, e)
            return
        next_tokens = logits[: len(decoding), 0].max(dim=-1).indices.tolist()
        for i, request in enumerate(decoding):
            request.length += 1
            self.take_token(request, logits[i, 0], next_tokens[i])
        for i, (request, ids) in enumerate(pieces, start=len(decoding)):
            n = len(ids)
            if request.on_prompt_logits is not None:
                self.call(request, request.on_prompt_logits, logits[i, :n])
            request.length += n
            if request.finish_reason is None and request.length == len(request.prompt_ids):
                if request.max_new_tokens == 0:  # the prompt's logits were all it asked for
                    request.finish_reason = "length"
                    self.leave(request)
                    continue
                self.take_token(request, logits[i, n - 1 if all_logits else 0])
                if request.finish_reason is None:
                    self.prefilling.remove(request)
                    self.decoding.append(request)  # its cache row moves to its place before the next step
            if request.finish_reason is not None:
                self.leave(request)
        for request in [r for r in decoding if r.finish_reason is not None]:
            self.leave(request)
        self.time_chunk(time.perf_counter() - start, sum(len(ids) for _, ids in pieces), budget, len(decoding))

    def forward_rows(self, rows: list[tuple[Request, list[int]]], first_row: int, all_logits: bool) -> Tensor:
        """Logits (B, 1, vocab) at the last of each row's new tokens, or (B, T, vocab) at all of them, for
        requests whose next token ids continue their KV-cache rows first_row, first_row + 1, ...; rows are
        right-padded to the longest, the padding writing to the scratch slot."""
        width = max(len(ids) for _, ids in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        slots = torch.full((len(rows), width), self.scratch_slot)
        tokens_at = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (request, ids) in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
            slots[i, : len(ids)] = torch.arange(request.length, request.length + len(ids))
            tokens_at[i, : len(ids)] = True
        positions = torch.tensor([request.length for request, _ in rows])[:, None] + torch.arange(width)
        used = max(request.length + len(ids) for request, ids in rows)
        mask = (torch.arange(used) <= positions[:, :, None])[:, None]
        logits_at = None if all_logits else torch.tensor([len(ids) - 1 for _, ids in rows], device=self.device)
        packed = None if bool(tokens_at.all()) else tokens_at.to(self.device)
        inputs = [t.to(self.device) for t in (tokens, positions, mask, slots)]
        with torch.inference_mode():
            return self.model(*inputs, first_row=first_row, tokens_at=packed, logits_at=logits_at)

    def time_chunk(self, seconds: float, tokens: int, budget: int, decoded: int) -> None:
        """Counts a prefill forward in the stats, and sizes the next chunk beside decoding rows so that it costs
        about one decoding step on top of theirs (a prompt's short last piece says little, unless it was slow).
        A forward that also decoded rows gives the fastest recent step's time of it to decoding."""
        step = min(self.step_seconds, default=None)  # a neighbour's load only ever slows a step down
        decoding_share = min(step, seconds) if decoded and step is not None else 0.0
        self.stats["tokens"] += decoded
        self.stats["decode_seconds"] += decoding_share
        self.stats["prompt_tokens"] += tokens
        self.stats["prompt_seconds"] += seconds - decoding_share
        if self.decoding and step is not None and tokens and (tokens == budget or seconds - decoding_share > step):
            extra = max(seconds - decoding_share, step / 8)  # at most 8 times longer a chunk each time
            self.chunk = min(max(SMALLEST_CHUNK, round(tokens * step / extra)), IDLE_PREFILL_TOKENS)

    def place_rows(self, requests: list[Request], first_row: int) -> None:
        """Moves the requests' keys and values to cache rows first_row, first_row + 1, ... in their order."""
        for i, request in enumerate(requests, start=first_row):
            if request.row != i:
                self.move_to_row(request, i)

    def compiled_step(self, batch_size: int) -> tuple[int, Callable[..., Tensor]] | None:
        """The compiled step that decodes batch_size rows (padded to its own batch size, step), or None."""
        return self.compiled.get(batch_size) if self.compiled is not None else None

    def decode(self) -> None:
        """One token for every decoding row: one step over cache rows 0..B-1, or a compiled step for a batch of
        B or more, whose padding rows write to the scratch slot and read slot 0."""
        self.place_rows(self.decoding, 0)
        batch_size = len(self.decoding)
        compiled = self.compiled_step(batch_size)
        padding = 0 if compiled is None else compiled[0] - batch_size
        lengths = [request.length for request in self.decoding]
        tokens = torch.tensor([[request.output_ids[-1]] for request in self.decoding] + [[0]] * padding)
        positions = torch.tensor([[length] for length in lengths] + [[0]] * padding)
        slots = torch.tensor([[length] for length in lengths] + [[self.scratch_slot]] * padding)
        mask = (torch.arange(max(lengths) + 1) <= positions[:, :, None])[:, None]
        inputs = [t.to(self.device) for t in (tokens, positions, mask, slots)]
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = (self.model if compiled is None else compiled[1])(*inputs)[:batch_size, -1]
            next_tokens = logits.max(dim=-1).indices.tolist()  # every row's greedy choice, in one go
        except Exception as e:  # fails the rows of this step, not the engine
            for request in list(self.decoding):
                self.fail(request, e)
            return
        for i, request in enumerate(self.decoding):
            request.length += 1
            self.take_token(request, logits[i], next_tokens[i])
        seconds = time.perf_counter() - start
        self.stats["tokens"] += batch_size
        self.stats["decode_seconds"] += seconds
        self.step_seconds.append(seconds)
        for request in [r for r in self.decoding if r.finish_reason is not None]:
            self.leave(request)

    def take_token(self, request: Request, logits: Tensor, greedy_token: int | None = None) -> None:
        """Draws the request's next token from its logits (vocab,) and hands it on; sets finish_reason when the
        answer ends there."""
        try:
            if request.temperature == 0 and greedy_token is not None:
                token = greedy_token
            else:
                settings = (request.temperature, request.top_p, request.top_k, request.generator)
                token = int(sample(logits[None], *settings))
        except Exception as e:
            request.finish_reason, request.error = "error", f"{type(e).__name__}: {e}"
            return
        if token != self.eos_id:
            request.output_ids.append(token)
        row_logits = logits if request.logits else None
        if request.on_token is not None and self.call(request, request.on_token, token, row_logits):
            request.finish_reason = request.finish_reason or "halted"
        if token == self.eos_id:
            request.finish_reason = request.finish_reason or "stop"
        elif request.finish_reason is None and len(request.output_ids) >= request.max_new_tokens:
            request.finish_reason = "length"

    @staticmethod
    def call(request: Request, callback: Callable, *args) -> bool:
        """callback(*args), as a bool; a callback that raises fails its request, not the engine."""
        try:
            return bool(callback(*args))
        except Exception as e:
            request.finish_reason, request.error = "error", f"{type(e).__name__}: {e}"
            return False

    # -----------------------------------------------------------------------------------------------------
    # Rows

    def fail(self, request: Request, error: Exception) -> None:
        request.finish_reason, request.error = "error", f"{type(error).__name__}: {error}"
        self.leave(request)

    def leave(self, request: Request) -> None:
        """Frees the request's row and reports its end. Among the decoding requests the last one takes its place,
        and its row moves there before the next step (decode)."""
        if request in self.decoding:
            last = self.decoding.pop()
            if last is not request:
                self.decoding[self.decoding.index(request)] = last
        else:
            self.prefilling.remove(request)
        self.free_rows.add(request.row)
        with self.lock:
            self.taken_rows -= 1
        self.report_end(request)

    @staticmethod
    def report_end(request: Request) -> None:
        if request.on_end is not None:
            with contextlib.suppress(Exception):  # a broken callback may not take the engine down with it
                request.on_end(request)
        request.ended.set()

    def move_to_row(self, request: Request, row: int) -> None:
        """Moves the request's keys and values to `row`, swapping with the request there, if any."""
        holder = next((r for r in self.decoding + self.prefilling if r.row == row), None)
        n = max(request.length, holder.length if holder is not None else 0)
        for layer in self.model.layers:
            cache = layer.self_attn.cache
            for buffer in (cache.k, cache.v):
                held = buffer[row, :, :n].clone() if holder is not None else None
                buffer[row, :, :n] = buffer[request.row, :, :n]
                if held is not None:
                    buffer[request.row, :, :n] = held
        if holder is None:
            self.free_rows.remove(row)
            self.free_rows.add(request.row)
        else:
            holder.row = request.row
        request.row = row

    def cache_bytes_per_row(self) -> int:
        """What a row of the KV cache costs: keys and values of every layer at every position."""
        return sum(layer.self_attn.cache.k[0].nbytes * 2 for layer in self.model.layers)


# ---------------------------------------------------------------------------------------------------------
# The batch API


def row_seeds(seed: int | None, n: int) -> list[int | None]:
    """A seed for each of n rows drawn from one seed: a row's draws do not depend on the others'."""
    if seed is None:
        return [None] * n
    return torch.randint(2**62, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate_ids(
    model: Transformer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    on_token: Callable[[int, int], bool | None] | None = None,
    compiled: CompiledSteps | None = None,
    max_batch_size: int | None = None,
) -> list[list[int]]:
    """Answers to prompts (token ids, BOS included) as token ids, EOS left out, decoded by an Engine in the calling
    thread, max_batch_size at a time (default: all).

    Each answer stops at EOS, after max_new_tokens, or when prompt + answer fill the model's context. on_token, if
    given, is called with (prompt index, token) for every new token; True ends that answer there (a stop string was
    produced, or the reader went away), keeping the tokens so far. The same seed gives the same answers, each
    row drawing from a seed of its own (row_seeds). The KV cache stays with the model for the next call
    (model.clear_cache() frees it)."""
    check_prompt_lengths(prompt_ids, model.model_args.max_seq_len)
    # Rounded up, so that later calls find a cache (and a compiled step) of the same length.
    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens
    max_len = min(-(-longest // 256) * 256, model.model_args.max_seq_len)
    engine = Engine(model, eos_id, max_batch_size or len(prompt_ids), max_len=max_len, compiled=compiled)
    requests = [
        Request(ids, max_new_tokens, temperature, top_p, top_k, row_seed)
        for ids, row_seed in zip(prompt_ids, row_seeds(seed, len(prompt_ids)), strict=True)
    ]
    if on_token is not None:
        for i, request in enumerate(requests):
            request.on_token = lambda token, _, i=i: token != eos_id and on_token(i, token)
    engine.submit(requests)
    engine.run_until_done()
    for request in requests:
        if request.finish_reason == "error":
            raise RuntimeError(f"decoding failed: {request.error}")
    return [request.output_ids for request in requests]


class TextStream:
    """Decodes one answer token by token into text that is safe to print as it comes: a character that
    byte-fallback pieces spell over several tokens is held back until its last byte has arrived."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded answer already handed out

    def add(self, token: int) -> str:
        self.ids.append(token)
        # Incomplete UTF-8 at the end decodes to U+FFFD for now; everything before it is final.
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        new_text = text[self.shown :]
        self.shown += len(new_text)
        return new_text

    def finish(self) -> str:
        """What is left, including any bytes that never became a character."""
        return self.tokenizer.decode(self.ids)[self.shown :]


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    compiled: CompiledSteps | None = None,
    max_batch_size: int | None = None,
) -> list[str]:
    """Answers to formatted prompt texts (see generate_ids). on_text, if given, receives (prompt index, new text)
    as each answer grows."""
    streams = [TextStream(tokenizer) for _ in prompts]

    def stream_token(i: int, token: int) -> None:
        if new_text := streams[i].add(token):
            on_text(i, new_text)

    prompt_ids = [tokenizer.encode(prompt, bos=True) for prompt in prompts]
    answer_ids = generate_ids(
        model, prompt_ids, max_new_tokens, tokenizer.eos_id, temperature, top_p, top_k, seed,
        on_token=stream_token if on_text is not None else None, compiled=compiled, max_batch_size=max_batch_size,
    )  # fmt: skip
    if on_text is not None:
        for i, stream in enumerate(streams):
            if rest := stream.finish():
                on_text(i, rest)
    return [tokenizer.decode(ids) for ids in answer_ids]

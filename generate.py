"""Prompting a LLaMA checkpoint: the Alpaca template, a preallocated KV cache, greedy decoding or sampling
(temperature, top-k, top-p), batches of prompts of different lengths, and the answer streamed as it is produced.

    python generate.py --model_path out "Give three tips for staying healthy."
    python generate.py --model_path out --prompts prompts.txt --output_format jsonl > answers.jsonl
    python generate.py --model_path out --eval_data heldout.json   # exact match and loss on Alpaca records

As a library: `generate(model, tokenizer, prompts)` takes prompt texts that are already formatted (see
`data.format_prompt`) and returns the answers; `generate_ids` does the same on token ids.
"""

import argparse
import getpass
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from checkpoint import is_adapter_dir, load_adapter, load_model, read_adapter_config, read_args
from cli import ArgumentParser
from data import decode_text, format_prompt, load_dataset, parse_records, rank_micro_batches, read_records
from model import ModelArgs, Transformer, cap_cpu_kernel_caches, merge_lora
from tokenizer import Tokenizer

DEFAULT_MODEL_PATH = "out"  # where train.py writes its final model by default


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
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the more likely tokens before it already reach top_p; the most likely always stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_prompt_lengths(prompt_ids: list[list[int]], max_seq_len: int) -> None:
    """Refuses prompts that leave no room for an answer in the model's context. Cutting them to fit would drop
    the start of an Alpaca prompt, which holds the template and the instruction, so the answer would be noise."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= max_seq_len:
            raise ValueError(
                f"prompt {i + 1} is {len(ids)} tokens long, but the model's context is {max_seq_len} tokens "
                "and the answer needs at least one: shorten the prompt"
            )


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    on_token: Callable[[list[int]], list[bool] | None] | None = None,
    decode_step: Callable[..., Tensor] | None = None,
    sample_next: Callable[[Tensor], Tensor] | None = None,
    on_prompt_logits: Callable[[Tensor], None] | None = None,
) -> list[list[int]]:
    """Answers to a batch of prompts (token ids, BOS included) as token ids, EOS left out.

    Each answer stops at EOS, after max_new_tokens, or when prompt + answer fill the model's context.
    on_token, if given, is called after every step with the token each row just produced (EOS again for a
    row that has finished); it may return a flag per row, True to finish that row there (a stop string was
    produced, or the reader went away), its answer keeping the tokens so far. The same seed gives the same
    answers for the same batch. decode_step runs the model on each new token: the model itself by default, or
    what compile_decoding returns. sample_next, if given, picks each row's next token (B,) from the last-position
    logits (B, vocab) in place of temperature, top_p, top_k and seed: for settings that differ from row to row.
    on_prompt_logits, if given, receives the logits of every prompt position (B, T, vocab) once the prompts have
    run, even with max_new_tokens 0: left-padded, so row i's prompt is its last len(prompt_ids[i]) positions.
    The KV cache stays with the model for the next call (model.clear_cache() frees it).
    """
    check_prompt_lengths(prompt_ids, model.args.max_seq_len)
    device = model.embed_tokens.weight.device
    batch_size, prompt_len = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    max_answer_lens = (model.args.max_seq_len - lengths).clamp(max=max_new_tokens)
    steps = int(max_answer_lens.max())
    if steps <= 0 and on_prompt_logits is None:
        return [[] for _ in prompt_ids]

    # Left padding ends every prompt at cache slot prompt_len - 1, so all rows write each new token to the same
    # slot. Padding is masked out and never read, so any id the embedding has will do: 0.
    tokens = torch.tensor([[0] * (prompt_len - len(ids)) + ids for ids in prompt_ids], device=device)
    cache_len = prompt_len + steps
    if decode_step is not None:  # compiled for one cache length: rounded up, later calls and runs reuse it
        cache_len = min(-(-cache_len // 256) * 256, model.args.max_seq_len)
    slots = torch.arange(model.setup_cache(batch_size, cache_len), device=device)
    first_real_slot = (prompt_len - lengths)[:, None]
    is_real = slots >= first_real_slot  # (B, slots): False on each row's padding
    positions = (slots - first_real_slot).clamp(min=0)  # RoPE positions count from each row's first real token
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
    # A padding query may attend to itself: a query that may attend to nothing gives NaN, which the cache keeps.
    diagonal = torch.eye(prompt_len, dtype=torch.bool, device=device)
    prefill_mask = (causal & is_real[:, None, :prompt_len]) | diagonal

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    answers = torch.empty(batch_size, steps, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    # A compiled step keeps its shapes: its mask spans the whole cache, the slots after this one masked out.
    # Uncompiled, attention reads only the slots written so far.
    read_all_slots = decode_step is not None
    decode_step = model if decode_step is None else decode_step
    logits = model(tokens, positions[:, :prompt_len], prefill_mask[:, None], slots[:prompt_len])
    if on_prompt_logits is not None:
        on_prompt_logits(logits)
        if steps <= 0:
            return [[] for _ in prompt_ids]
    for step in range(steps):
        if sample_next is None:
            next_token = sample(logits[:, -1], temperature, top_p, top_k, generator)
        else:
            next_token = sample_next(logits[:, -1])
        next_token = next_token.masked_fill(finished, eos_id)
        answers[:, step] = next_token
        finished |= (next_token == eos_id) | (step + 1 >= max_answer_lens)
        if on_token is not None and (stop_rows := on_token(next_token.tolist())) is not None:
            finished |= torch.tensor(stop_rows, device=device)
        if step + 1 == steps or finished.all():
            break
        slot = prompt_len + step
        read = slots if read_all_slots else slots[: slot + 1]
        logits = decode_step(
            next_token[:, None],
            positions[:, slot : slot + 1],
            (is_real[:, : len(read)] & (read <= slot))[:, None, None],
            slots[slot : slot + 1],
        )
    rows = answers[:, : step + 1].tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight oneDNN has reordered once into its own blocked layout, the form
    oneDNN's products read fastest; the plain weight is not kept."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # tuned for a batch of 1 row

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class Int8Linear(nn.Module):
    """A bias-free linear layer with weight-only int8 quantization, as gpt-fast's WeightOnlyInt8Linear: each
    output channel (weight row) is rounded to int8 steps of its own scale, max |row| / 127, and the product
    runs on the int8 weight with the activations in their own dtype. Decoding reads half the bytes of bf16."""

    def __init__(self, weight: Tensor):
        super().__init__()
        # The scales are kept in the weight's dtype, the one the product takes them in, and rounding uses them
        # as kept; an all-zero row must not divide by zero.
        scales = (weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127).to(weight.dtype)
        int8_weight = (weight.detach().float() / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        product = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.int8_weight, self.scales)
        return product.view(*x.shape[:-1], -1)


def swap_linear_layers(model: Transformer, make_linear: Callable[[Tensor], nn.Module]) -> None:
    """Every linear layer becomes make_linear(its weight), with q/k/v and gate/up fused into one product each
    (Transformer.fuse_projections). The output layer keeps its plain weight too: the loss (`labels=`) reads it."""
    model.fuse_projections(make_linear)
    for layer in model.layers:
        layer.self_attn.o_proj = make_linear(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj = make_linear(layer.mlp.down_proj.weight)
    lm_head = make_linear(model.lm_head.weight)
    lm_head.weight = model.lm_head.weight
    model.lm_head = lm_head


def use_cpu_decoding_layout(model: Transformer) -> None:
    """Stores every linear weight in oneDNN's packed layout, the one the CPU's matrix-vector products read
    fastest, with q/k/v and gate/up fused (Transformer.fuse_projections); the values do not change. Decoding one
    row multiplies a vector by each weight in turn, which is memory-bound, and oneDNN streams packed weights
    faster than MKL reads plain ones (BENCHMARKS.md). Needs oneDNN, and for bf16 a CPU with native bf16
    products; otherwise the model stays as it is. CUDA's products (cuBLAS) need no such change."""
    dtype = model.embed_tokens.weight.dtype
    packable = torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
    if packable:
        swap_linear_layers(model, PackedLinear)


def quantize_int8(model: Transformer) -> None:
    """Weight-only int8 (Int8Linear) for every linear layer, the output layer included: at batch 1 decoding
    streams every weight once per token, so half the bytes of bf16 is up to twice the speed. The embedding
    stays as it is (a token reads one row of it)."""
    device = model.embed_tokens.weight.device
    if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", device.type.upper()):
        raise ValueError(f"--quantize int8: this torch ({torch.__version__}) has no int8 weight product on {device}")
    swap_linear_layers(model, Int8Linear)


def compile_decoding(model: Transformer) -> Callable[..., Tensor]:
    """The model compiled for decoding steps, to pass to generate_ids as decode_step; prompts still run through
    the model as it is. The weights are frozen into the compiled code (a later change to them is not seen),
    max-autotune lets Inductor use its own matrix-vector kernels where they beat the library's, and the work
    between the products is fused (BENCHMARKS.md). q/k/v and gate/up are fused first
    (Transformer.fuse_projections), unless they are already (quantize_int8). On the CPU the step is compiled ahead
    of time into a library kept on disk (AOTDecodeStep); elsewhere torch.compile compiles it, as gpt-fast
    does, on the first step and again for a new batch size or a longer KV cache."""
    if model.layers[0].self_attn.qkv_proj is None:
        model.fuse_projections()
    if model.embed_tokens.weight.device.type == "cpu":
        return AOTDecodeStep(model)
    configure_inductor()
    return torch.compile(model, mode="max-autotune", dynamic=False)


def configure_inductor() -> None:
    """Inductor as compile_decoding compiles: the weights frozen, autotuning quiet."""
    from torch._inductor import config  # 1 s to import, so only when compiling

    config.freezing = True
    # Autotuning reports every matrix product it times on stderr, and warns of a deprecation inside Inductor.
    config.autotune_num_choices_displayed = 0
    config.max_autotune_report_choices_stats = False
    warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)


class AOTDecodeStep:
    """A decoding step compiled ahead of time (torch.export, then AOTInductor) into a shared library on disk, one
    per model (code, weights and settings), batch size and KV-cache length, and per torch, CPU instruction set
    and thread count. A later process with the same finds the library and loads it in a fraction of a second
    instead of compiling for a minute: torch.compile's own cache skips a step whose frozen weights oneDNN has
    packed. The compiled step writes keys and values into the model's own KV cache, so the prompt, which runs
    uncompiled, and the steps share it."""

    def __init__(self, model: Transformer):
        self.model = model
        self.digest = weights_digest(model)
        self.steps: dict[tuple[int, int], tuple[Any, Tensor | None]] = {}  # (B, cache length): library, its cache

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor, cache_slots: Tensor) -> Tensor:
        inputs = [tokens, positions, mask, cache_slots]
        shape = (tokens.shape[0], mask.shape[-1])
        if shape not in self.steps:
            self.steps[shape] = self.load(self.library_path(*shape), inputs), None
        step, bound_cache = self.steps[shape]
        cache = self.model.layers[0].self_attn.cache.k
        if bound_cache is not cache:  # the model has a new KV cache since this step last ran
            caches = {
                f"layers.{i}.self_attn.cache.{name}": getattr(layer.self_attn.cache, name)
                for i, layer in enumerate(self.model.layers)
                for name in ("k", "v")
            }
            names = step.get_constant_names_to_original_fqns()
            own_caches = {name: caches[fqn] for name, fqn in names.items() if fqn in caches}
            # The library's cache buffers become the model's tensors themselves (user-managed), not copies.
            step.update_constant_buffer(own_caches, use_inactive=False, validate_full_updates=False, user_managed=True)
            self.steps[shape] = step, cache
        return step.run(inputs)[0]

    def library_path(self, batch_size: int, cache_len: int) -> str:
        # Inductor's cache directory, worked out as Inductor does: importing Inductor to ask would take a second.
        cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"
        )
        setting = f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} threads"
        name = hashlib.sha256(f"{self.digest} {self.model.args} {setting}".encode()).hexdigest()[:32]
        return os.path.join(cache_dir, "decoding", f"{name}-b{batch_size}-s{cache_len}", "step.so")

    def load(self, path: str, inputs: list[Tensor]) -> Any:
        if not os.path.exists(path):
            print(f"compiling the decoding step for batch {inputs[0].shape[0]} (a minute or more; kept in "
                  f"{os.path.dirname(path)} for later runs)", file=sys.stderr, flush=True)  # fmt: skip
            configure_inductor()
            program = torch.export.export(self.model, tuple(inputs))
            building = f"{os.path.dirname(path)}.{os.getpid()}.partial"
            # Weights of 1B+ parameters do not fit in a shared library's data section: they are mapped instead.
            options = {"freezing": True, "max_autotune": True, "aot_inductor.force_mmap_weights": True}
            options["aot_inductor.output_path"] = os.path.join(building, "step.so")
            torch._inductor.aot_compile(program.module(), tuple(inputs), options=options)
            try:  # whole or not at all; a process that built the same at the same time has put its own in place
                os.rename(building, os.path.dirname(path))
            except OSError:
                shutil.rmtree(building)
        return torch._C._aoti.AOTIModelContainerRunnerCpu(path, 1)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the code the model runs (model.py, and this file for the int8 layers) and of every parameter
    and persistent buffer: its name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path in (sys.modules[type(model).__module__].__file__, __file__):
        with open(path, "rb") as code:
            digest.update(code.read())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
    decode_step: Callable[..., Tensor] | None = None,
) -> list[str]:
    """Answers to formatted prompt texts, run as one batch (see generate_ids). on_text, if given, receives
    (prompt index, new text) as each answer grows."""
    streams = [TextStream(tokenizer) for _ in prompts]

    def stream_tokens(tokens: list[int]) -> None:
        for i, token in enumerate(tokens):
            if new_text := streams[i].add(token):
                on_text(i, new_text)

    prompt_ids = [tokenizer.encode(prompt, bos=True) for prompt in prompts]
    answer_ids = generate_ids(
        model,
        prompt_ids,
        max_new_tokens,
        tokenizer.eos_id,
        temperature,
        top_p,
        top_k,
        seed,
        on_token=stream_tokens if on_text is not None else None,
        decode_step=decode_step,
    )
    if on_text is not None:
        for i, stream in enumerate(streams):
            if rest := stream.finish():
                on_text(i, rest)
    return [tokenizer.decode(ids) for ids in answer_ids]


@torch.inference_mode()
def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    data_path: str,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    decode_step: Callable[..., Tensor] | None = None,
) -> tuple[int, int, float]:
    """(exact matches, records, mean loss per supervised token) of the model on an Alpaca file. An answer
    matches when the greedy answer and the record's output are equal once stripped of surrounding whitespace.
    The loss is teacher-forced on the tokens and labels that training uses (data.load_dataset), so it compares
    with the loss train.py logs. Records whose prompt alone fills the model's context are left out of both."""
    dataset = load_dataset(data_path, tokenizer, model.args.max_seq_len)
    all_records = read_records(data_path)
    records = [all_records[i] for i in dataset.source_indices]
    device = model.embed_tokens.weight.device
    matches, summed_loss = 0, 0.0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [format_prompt(instruction, input) for instruction, input, _ in batch]
        answers = generate(model, tokenizer, prompts, max_new_tokens, decode_step=decode_step)
        matches += sum(answer.strip() == output.strip() for answer, (*_, output) in zip(answers, batch, strict=True))
        # Right padding follows every real token, so the causal mask hides it from them, and it has no label:
        # any id will do.
        (tokens,) = rank_micro_batches(
            dataset, np.arange(start, start + len(batch)), 0, 1, len(batch), False, model.args.max_seq_len, pad_id=0
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


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that load_tokenizer and load_for_decoding read (serve.py and self_instruct.py take them too)."""
    parser.add_argument(
        "--model_path",
        help="Hugging Face or Meta LLaMA directory, or a LoRA adapter directory (adapter_config.json) "
        f"(default: ./{DEFAULT_MODEL_PATH}, where train.py exports)",
    )
    parser.add_argument(
        "--base_model",
        help="when --model_path is a LoRA adapter (PEFT) directory: its base model (default: the adapter's "
        "base_model_name_or_path)",
    )
    parser.add_argument("--tokenizer", help="SentencePiece model (default: MODEL_PATH/tokenizer.model)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if there is one, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights and compute (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: weight-only int8 with a scale per output channel for every linear layer: half the bytes of "
        "bf16 to read per token, which pays most with --compile; the tokens may differ a little from the "
        "unquantized model's",
    )


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
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default: 8)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="answer length limit (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default: 0.7)")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, in (0, 1] (default: 0.9)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely (default: 0, all)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    parser.add_argument(
        "--output_format",
        choices=["text", "jsonl"],
        default="text",
        help="text: the answers, a blank line between them (streamed when a batch holds one prompt). "
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
        "new batch size and answer length (by 256 tokens). On the CPU the compiled step is kept on disk (in "
        "TORCHINDUCTOR_CACHE_DIR) and a later run with the same model and settings loads it in seconds",
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
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    for flag in ("top_k", "max_new_tokens", "batch_size"):
        lowest = 0 if flag == "top_k" else 1
        if getattr(args, flag) < lowest:
            raise ValueError(f"--{flag} must be >= {lowest}, got {getattr(args, flag)}")
    args.model_path = model_path_or_default(args.model_path)
    return args


def model_path_or_default(model_path: str | None) -> str:
    if model_path is not None:
        return model_path
    if not os.path.isdir(DEFAULT_MODEL_PATH):
        raise ValueError(f"no model in ./{DEFAULT_MODEL_PATH} (where train.py exports): pass --model_path DIR")
    return DEFAULT_MODEL_PATH


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def print_stream(stream: TextStream, tokens: list[int]) -> None:
    print(stream.add(tokens[0]), end="", flush=True)


def model_dirs(args: argparse.Namespace) -> tuple[str, str | None]:
    """The model directory and the LoRA adapter directory to apply to it (None: no adapter). --model_path may be
    a PEFT adapter directory; its base is then --base_model, or the one its config names."""
    base_model = args.base_model
    if not is_adapter_dir(args.model_path):
        if base_model is not None:
            raise ValueError(f"--base_model goes with a LoRA adapter directory; {args.model_path} is not one")
        return args.model_path, None
    base = base_model or read_adapter_config(args.model_path).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        config_path = os.path.join(args.model_path, "adapter_config.json")
        where = f"--base_model {base}" if base_model else f"{config_path}: base_model_name_or_path {base!r}"
        raise ValueError(f"{where}: no such model directory (pass the base model with --base_model DIR)")
    return base, args.model_path


def record_time(
    times: list[float], on_token: Callable[[list[int]], list[bool] | None] | None, tokens: list[int]
) -> list[bool] | None:
    """An on_token that notes when each step's tokens are out, then hands them on."""
    times.append(time.perf_counter())
    return None if on_token is None else on_token(tokens)


def load_tokenizer(args: argparse.Namespace) -> tuple[ModelArgs, Tokenizer]:
    model_path, _ = model_dirs(args)
    model_args = read_args(model_path)  # a bad directory or tokenizer fails fast, before the slow load
    tokenizer = Tokenizer(args.tokenizer or os.path.join(model_path, "tokenizer.model"))
    if tokenizer.n_words > model_args.vocab_size:
        raise ValueError(
            f"{tokenizer.model_path} has {tokenizer.n_words} pieces but the model in {model_path} only "
            f"{model_args.vocab_size} embedding rows: wrong tokenizer?"
        )
    return model_args, tokenizer


def load_for_decoding(args: argparse.Namespace) -> tuple[Transformer, Callable[..., Tensor] | None]:
    """The model, and the decoding step to pass to generate_ids (None: the model itself)."""
    device = pick_device(args.device)
    if device.type == "cpu":
        cap_cpu_kernel_caches()  # each new prompt length would keep a few MB more
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_path, adapter_path = model_dirs(args)
    model = load_model(model_path, dtype=dtype, device=device)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
        merge_lora(model)  # the same answers, one product per projection, and the layouts below apply
    if args.quantize == "int8":
        quantize_int8(model)  # in place of the CPU layout: its own products read int8 weights
    if args.compile:
        return model, compile_decoding(model)
    if device.type == "cpu" and args.quantize is None:
        use_cpu_decoding_layout(model)
    return model, None


def run_eval(args: argparse.Namespace) -> None:
    model_args, tokenizer = load_tokenizer(args)
    load_dataset(args.eval_data, tokenizer, model_args.max_seq_len)  # every record checked before the slow load
    model, decode_step = load_for_decoding(args)
    matches, n_records, loss = evaluate(
        model, tokenizer, args.eval_data, args.batch_size, args.max_new_tokens, decode_step
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
    check_prompt_lengths(prompt_ids, model_args.max_seq_len)  # all of them, before the first batch runs
    model, decode_step = load_for_decoding(args)

    prompt_tokens, prompt_seconds, decode_tokens, decode_seconds = 0, 0.0, 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompt_ids[start : start + args.batch_size]
        streaming = len(batch) == 1 and args.output_format == "text"
        stream = TextStream(tokenizer)
        on_token = partial(print_stream, stream) if streaming else None
        times = [time.perf_counter()]  # then one entry per step: the first comes after the prompt has run
        answer_ids = generate_ids(
            model,
            batch,
            args.max_new_tokens,
            tokenizer.eos_id,
            args.temperature,
            args.top_p,
            args.top_k,
            args.seed,
            on_token=partial(record_time, times, on_token) if args.stats else on_token,
            decode_step=decode_step,
        )
        if args.stats:
            prompt_tokens += sum(len(ids) for ids in batch)
            prompt_seconds += times[1] - times[0]
            decode_tokens += (len(times) - 2) * len(batch)  # every row of each step after the first, ended or not
            decode_seconds += times[-1] - times[1]
        for i, ids in enumerate(answer_ids):
            index = start + i
            if args.output_format == "jsonl":
                instruction, input = prompts[index]
                record = {"prompt": instruction, "input": input, "answer": tokenizer.decode(ids)}
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                text = stream.finish() if streaming else tokenizer.decode(ids)
                print(text, end="\n" if index == len(prompts) - 1 else "\n\n", flush=True)
    if args.stats:
        decode_speed = decode_tokens / decode_seconds if decode_tokens else float("nan")  # nan: one token only
        print(f"prompt {prompt_tokens / prompt_seconds:.1f} tok/s, decode {decode_speed:.1f} tok/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as the Python docs recommend
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

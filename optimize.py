"""Fast decoding on the hardware at hand: oneDNN's packed weight layout on the CPU, weight-only int8, and compiled
decoding steps, which the CPU keeps as libraries on disk (AOTInductor) so that a later run loads them in a
fraction of a second instead of compiling for a minute.

The engine (engine.py) asks CompiledSteps for a step by batch size. compile_decoding(model) compiles in this
process when a step is first asked for, and the asker waits (generate.py). With builder flags, the steps are
built in a process of their own while the engine decodes uncompiled, and each is used once it is ready (serve.py,
self_instruct.py): no request waits for a compiler.

    python optimize.py --model_path DIR [--dtype ...] --build 1,2,4,8 --slots 2049   # what that process runs
"""

import argparse
import getpass
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from model import KVCache, Transformer


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
    (Transformer.fuse_projections) if they are not already. The output layer keeps its plain weight too: the loss
    (`labels=`) reads it."""
    if model.layers[0].self_attn.qkv_proj is None:
        model.fuse_projections(make_linear)
    else:
        for layer in model.layers:
            layer.self_attn.qkv_proj = make_linear(layer.self_attn.qkv_proj.weight)
            layer.mlp.gate_up_proj = make_linear(layer.mlp.gate_up_proj.weight)
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
    packable = model.embed_tokens.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
    packable &= dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
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


# ---------------------------------------------------------------------------------------------------------
# Compiled decoding steps


def configure_inductor() -> None:
    """Inductor as the decoding steps are compiled: the weights frozen, autotuning quiet."""
    from torch._inductor import config  # 1 s to import, so only when compiling

    config.freezing = True
    # Autotuning reports every matrix product it times on stderr, and warns of a deprecation inside Inductor.
    config.autotune_num_choices_displayed = 0
    config.max_autotune_report_choices_stats = False
    warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)


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


def library_path(digest: str, model: Transformer, batch_size: int, slots: int) -> str:
    """Where the step for this model (its weights_digest), batch size and KV-cache length is kept, per torch, CPU
    instruction set and thread count: in Inductor's cache directory, worked out as Inductor does (importing
    Inductor to ask would take a second)."""
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"
    )
    setting = f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} threads"
    name = hashlib.sha256(f"{digest} {model.model_args} {setting}".encode()).hexdigest()[:32]
    return os.path.join(cache_dir, "decoding", f"{name}-b{batch_size}-s{slots}", "step.so")


def build_library(model: Transformer, batch_size: int, slots: int, path: str) -> None:
    """Compiles the model's decoding step (torch.export, then AOTInductor) for a batch of batch_size rows of one
    token over a KV cache of `slots` positions, into the library at path. The number of slots a step reads (the
    mask's last dimension) stays free: a step reads only the positions written so far. The weights are frozen
    into the library and max-autotune lets Inductor pick its own matrix-vector kernels where they beat the
    library's (BENCHMARKS.md)."""
    configure_inductor()
    caches = [layer.self_attn.cache for layer in model.layers]
    a, device = model.model_args, model.embed_tokens.weight.device
    for layer, cache in zip(model.layers, caches, strict=True):  # the step's own cache, of its shape, for now
        layer.self_attn.cache = KVCache(batch_size, slots, a.n_kv_heads, a.head_dim, cache.k.dtype, device)
    try:
        used = max(2, slots // 2)
        positions = torch.full((batch_size, 1), used - 1, device=device)
        mask = torch.ones(batch_size, 1, 1, used, dtype=torch.bool, device=device)
        inputs = (torch.zeros(batch_size, 1, dtype=torch.long, device=device), positions, mask, positions)
        # Reading every slot is left out (max slots - 1): the last is the engine's scratch slot, never read.
        used_dim = torch.export.Dim("used", min=2, max=slots - 1)
        dynamic = {"tokens": None, "positions": None, "mask": {3: used_dim}, "cache_slots": None}
        with torch.no_grad():
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic)
        building = f"{os.path.dirname(path)}.{os.getpid()}.partial"
        # Weights of 1B+ parameters do not fit in a shared library's data section: they are mapped instead.
        options = {"freezing": True, "max_autotune": True, "aot_inductor.force_mmap_weights": True}
        options["aot_inductor.output_path"] = os.path.join(building, "step.so")
        torch._inductor.aot_compile(program.module(), inputs, options=options)
        try:  # whole or not at all; a process that built the same at the same time has put its own in place
            os.rename(building, os.path.dirname(path))
        except OSError:
            shutil.rmtree(building)
    finally:
        for layer, cache in zip(model.layers, caches, strict=True):
            layer.self_attn.cache = cache


class AOTDecodeStep:
    """A decoding step loaded from its library. It writes keys and values into the first batch_size rows of the
    model's own KV cache, so the prompts, which run uncompiled, and the steps share it."""

    def __init__(self, model: Transformer, path: str, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(path, 1)
        self.bound_cache: Tensor | None = None

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor, cache_slots: Tensor) -> Tensor:
        cache = self.model.layers[0].self_attn.cache.k
        if self.bound_cache is not cache:  # the model has a new KV cache since this step last ran
            rows = {
                f"layers.{i}.self_attn.cache.{name}": getattr(layer.self_attn.cache, name)[: self.batch_size]
                for i, layer in enumerate(self.model.layers)
                for name in ("k", "v")
            }
            names = self.runner.get_constant_names_to_original_fqns()
            own_rows = {name: rows[fqn] for name, fqn in names.items() if fqn in rows}
            # The library's cache buffers become views of the model's own (user-managed), not copies.
            self.runner.update_constant_buffer(own_rows, False, False, True)  # use_inactive, validate, user_managed
            self.bound_cache = cache
        return self.runner.run([tokens, positions, mask, cache_slots])[0]


class TorchCompiledStep:
    """Off the CPU: the model compiled by torch.compile, as gpt-fast does, on its first step for each batch size.
    The slots a step reads are rounded up to 256, so that it compiles again for a longer cache only that often."""

    def __init__(self, model: Transformer):
        configure_inductor()
        self.step = torch.compile(model, mode="max-autotune", dynamic=False)
        self.slots = model.layers[0].self_attn.cache.k.shape[2]

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor, cache_slots: Tensor) -> Tensor:
        padded = min(-(-mask.shape[-1] // 256) * 256, self.slots - 1)
        mask = torch.nn.functional.pad(mask, (0, padded - mask.shape[-1]))
        return self.step(tokens, positions, mask, cache_slots)


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes compiled for an engine of max_batch_size rows: powers of two below it, and itself. A batch
    runs in the smallest one that holds it, its other rows padding."""
    return sorted({2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size} | {max_batch_size})


class CompiledSteps:
    """Compiled decoding steps by batch size, for an engine's KV cache. Without builder_flags, get() compiles
    (or loads) the step for the cache's whole batch, in this process, and returns it. With builder_flags (the
    model flags it was loaded with, loading.model_flags), prepare() starts a process that builds the steps for
    batch_buckets that are not on disk yet, and get() returns only steps that are ready: None until then, and
    the engine decodes uncompiled."""

    def __init__(self, model: Transformer, builder_flags: list[str] | None = None):
        if model.layers[0].self_attn.qkv_proj is None:
            model.fuse_projections()  # fewer, larger products: the compiled step's weights
        if model.embed_tokens.weight.device.type != "cpu":  # torch.compile compiles in this process, when asked
            builder_flags = None
        self.model, self.builder_flags = model, builder_flags
        self.digest = weights_digest(model)
        self.ready: dict[tuple[int, int], AOTDecodeStep | TorchCompiledStep] = {}  # (batch size, slots): step
        self.slots: int | None = None
        self.lock = threading.Lock()

    def prepare(self, rows: int, slots: int) -> None:
        """The engine's KV cache is rows x slots: with builder_flags, start building its steps."""
        if self.builder_flags is None or self.slots == slots:
            return
        self.slots = slots
        paths = {b: library_path(self.digest, self.model, b, slots) for b in batch_buckets(rows)}
        threading.Thread(target=self.build_in_background, args=(paths, slots), daemon=True).start()

    def get(self, batch_size: int) -> tuple[int, Callable[..., Tensor]] | None:
        cache = self.model.layers[0].self_attn.cache.k
        rows, slots = cache.shape[0], cache.shape[2]
        if self.builder_flags is not None:
            with self.lock:
                fits = [b for (b, s) in self.ready if s == slots and batch_size <= b <= rows]
                return (min(fits), self.ready[min(fits), slots]) if fits else None
        if (rows, slots) not in self.ready:
            self.ready[rows, slots] = self.compile_here(rows, slots)
        return rows, self.ready[rows, slots]

    def compile_here(self, batch_size: int, slots: int) -> AOTDecodeStep | TorchCompiledStep:
        if self.model.embed_tokens.weight.device.type != "cpu":
            return TorchCompiledStep(self.model)
        path = library_path(self.digest, self.model, batch_size, slots)
        if not os.path.exists(path):
            print(f"compiling the decoding step for batch {batch_size} (a minute or more; kept in "
                  f"{os.path.dirname(path)} for later runs)", file=sys.stderr, flush=True)  # fmt: skip
            build_library(self.model, batch_size, slots, path)
        return AOTDecodeStep(self.model, path, batch_size)

    def build_in_background(self, paths: dict[int, str], slots: int) -> None:
        """Loads the steps already on disk, has a process of its own build the others, and loads each as it is
        built; on failure the engine goes on uncompiled."""
        missing = [b for b, path in paths.items() if not os.path.exists(path)]
        for batch_size, path in paths.items():
            if batch_size not in missing:
                self.add(batch_size, slots, path)
        if not missing:
            return
        print(f"compiling decoding steps for batch sizes {', '.join(map(str, missing))} in the background "
              f"(minutes; kept in {os.path.dirname(os.path.dirname(paths[missing[0]]))}); decoding uncompiled "
              "until each is ready", file=sys.stderr, flush=True)  # fmt: skip
        command = [sys.executable, __file__, *self.builder_flags, "--build", ",".join(map(str, missing))]
        command += ["--slots", str(slots), "--threads", str(torch.get_num_threads())]
        with tempfile.TemporaryFile("w+") as log:
            builder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
            for line in builder.stdout:  # one line per step built: its batch size
                batch_size = int(line)
                self.add(batch_size, slots, paths[batch_size])
            if builder.wait() != 0:
                log.seek(0)
                last_line = (log.read().strip().splitlines() or ["no output"])[-1]
                print(f"compiling the decoding steps failed ({last_line}); decoding stays uncompiled for the batch "
                      "sizes not built", file=sys.stderr, flush=True)  # fmt: skip

    def add(self, batch_size: int, slots: int, path: str) -> None:
        if not os.path.exists(path):  # the builder's model differs from ours: its digest did
            return
        step = AOTDecodeStep(self.model, path, batch_size)
        with self.lock:
            self.ready[batch_size, slots] = step
        print(f"the compiled decoding step for batch {batch_size} is ready", file=sys.stderr, flush=True)


def build_main() -> None:
    """The builder process: loads the model as the engine's process did, and builds each missing step in turn,
    the smallest first, printing its batch size when its library is in place."""
    from loading import add_model_flags, load_model_for_decoding

    parser = argparse.ArgumentParser(description="builds compiled decoding steps (started by CompiledSteps)")
    add_model_flags(parser)
    parser.add_argument("--build", required=True, help="batch sizes, comma-separated")
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    os.nice(10)  # the serving process's uncompiled decoding comes first
    torch.set_num_threads(args.threads)
    model = load_model_for_decoding(args)
    if model.layers[0].self_attn.qkv_proj is None:
        model.fuse_projections()
    digest = weights_digest(model)
    model.setup_cache(1, args.slots)  # build_library replaces it by one of each batch size while it compiles
    for batch_size in sorted(int(b) for b in args.build.split(",")):
        path = library_path(digest, model, batch_size, args.slots)
        if not os.path.exists(path):
            build_library(model, batch_size, args.slots, path)
        print(batch_size, flush=True)


if __name__ == "__main__":
    build_main()

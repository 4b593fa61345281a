"""LLaMA: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention and a KV cache, plus checkpoint I/O.

Parameter names are those of Hugging Face's LlamaForCausalLM without its `model.` prefix, and RoPE uses
the rotate-half layout of HF-converted weights, so an HF directory loads with no renaming or permuting.
Meta's `consolidated.NN.pth` checkpoints are renamed and have q/k permuted from interleaved pairs on load.
"""

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

MAX_SHARD_BYTES = 5 * 1000**3  # what HF's save_pretrained uses by default ("5GB")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 11008  # SwiGLU width
    vocab_size: int = 32000
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            hidden_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id", 1),
            eos_token_id=_first(config.get("eos_token_id", 2)),
            pad_token_id=config.get("pad_token_id"),
        )

    def to_hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    @classmethod
    def from_meta_params(cls, params: dict, vocab_size: int) -> "ModelArgs":
        dim = params["dim"]
        # Meta's FeedForward: 2/3 of 4*dim, times an optional multiplier, rounded up to multiple_of.
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        multiple_of = params.get("multiple_of", 256)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        return cls(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            hidden_dim=hidden,
            vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
            norm_eps=params.get("norm_eps", 1e-6),
            rope_theta=params.get("rope_theta", 10000.0),
        )


PRESETS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
}


def _first(x: int | list[int]) -> int:
    return x[0] if isinstance(x, list) else x


def cap_cpu_kernel_caches() -> None:
    """oneDNN, and ideep (PyTorch's layer over it), keep the CPU matmul kernels they build for each new input
    shape, up to 1024 each at a few MB apiece: a padded training epoch grew to 12.9 GB per rank, and generating
    for prompts of 300 lengths by 0.6 GB. Both are capped at 64 here, unless set in the environment already.
    They are read when the first such matmul runs, so call this before it."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "64")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the compute dtype: bf16 loses too much in the mean of squares.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (B, T, head_dim) for integer positions (B, T), computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on x of shape (B, H, T, head_dim); cos/sin are (B, T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention_dtype(x: Tensor) -> torch.dtype:
    """fp32 on the CPU, whatever the weights: there PyTorch's bf16 attention is slower than fp32 (1.3-1.6x in
    training, 4x for one query in decoding; BENCHMARKS.md), and fp32 is the more exact. Elsewhere x's dtype."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


class KVCache(nn.Module):
    """Preallocated keys and values (B, n_kv_heads, max_len, head_dim), written at given slots, so each
    decoding step costs the same and nothing is reallocated."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor, used: int) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[:, :, :used], self.v[:, :, :used]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one product: see Transformer.fuse_projections
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache_slots: Tensor | None):
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dtype = attention_dtype(x)
        if cache_slots is not None:
            k, v = self.cache.update(cache_slots, k, v, used=mask.shape[-1])
        y = F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # fmt: skip
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # see Transformer.fuse_projections

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer plus a trainable low-rank update (LoRA): y = x W^T + B(A(dropout(x))) * alpha/r.
    The base keeps its parameter name (`q_proj.weight`) and the adapters get PEFT's (`q_proj.lora_A.weight`, [r, in];
    `q_proj.lora_B.weight`, [out, r]), so base checkpoints load unchanged and the adapters save under PEFT's keys."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        if self.weight.device.type != "meta":
            init_lora_(self.lora_A.weight, self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        # The adapters may be kept in another dtype than the base (fp32 over bf16): computed in theirs.
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return F.linear(x, self.weight) + update.to(x.dtype)


@torch.no_grad()
def init_lora_(lora_A: Tensor, lora_B: Tensor) -> None:
    """PEFT's default: A as nn.Linear initialises its weights, B zero, so training starts from the base model."""
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


def apply_lora(model: "Transformer", r: int, alpha: float, dropout: float, targets: Iterable[str]) -> None:
    """Freezes every parameter and wraps each layer's `targets` projections (names in LORA_TARGETS) in LoRALinear:
    afterwards only the adapters train."""
    if unknown := sorted(set(targets) - set(LORA_TARGETS)):
        raise ValueError(f"unknown LoRA target module {unknown[0]!r}; expected some of {', '.join(LORA_TARGETS)}")
    model.requires_grad_(False)
    for layer in model.layers:
        for name in targets:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout).train(model.training))


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """The update B A * scaling that merging adds to the base weight, in fp32."""
    return (lora_B.float() @ lora_A.float()) * scaling


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its base weight and puts a plain linear layer back: the same outputs (without
    dropout), at the cost of one product per projection."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            merged = module.weight.float() + lora_delta(module.lora_A.weight, module.lora_B.weight, module.scaling)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, _linear_with_weight(merged.to(module.weight.dtype)))


def merge_lora_tensors(tensors: Iterable[tuple[str, Tensor]], scaling: float) -> Iterator[tuple[str, Tensor]]:
    """The merged model's (name, tensor) pairs from a LoRA model's, streamed: each weight is held until the next
    name shows whether adapters follow it (LoRALinear yields weight, lora_A, lora_B in turn)."""
    held, lora_A = None, None
    for name, tensor in tensors:
        if name.endswith(".lora_A.weight"):
            lora_A = tensor
        elif name.endswith(".lora_B.weight"):
            weight_name, weight = held
            yield weight_name, (weight.float() + lora_delta(lora_A, tensor, scaling)).to(weight.dtype)
            held = None
        else:
            if held is not None:
                yield held
            held = name, tensor
    if held is not None:
        yield held


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache_slots: Tensor | None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache_slots: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or with `labels` the summed cross-entropy over labels that
        are not -100 (labels are already aligned with the logits: shift before calling).

        positions (B, T): RoPE positions, default 0..T-1; restart them per document for packed rows.
        mask: boolean, broadcastable to (B, 1, T, S), True where a query may attend a key; default causal.
        cache_slots (T,): with a KV cache set up, the cache slots the new keys go to; S is then the mask's
        last dimension, the number of cache slots in use.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        if cache_slots is not None and mask is None:
            used = torch.arange(int(cache_slots[-1]) + 1, device=tokens.device)
            mask = used[None, :] <= cache_slots[:, None]
        h = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache_slots)
        h = self.norm(h)
        if labels is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h, self.lm_head.weight, labels)

    def setup_cache(self, batch_size: int, max_len: int) -> int:
        """A KV cache for every layer, in the dtype attention runs in, of at least max_len slots; returns its
        length. The cache the model has is kept when it has batch_size rows and enough slots: a compiled
        decoding step is specialised to its buffers and would compile again for new ones."""
        p, a = self.embed_tokens.weight, self.args
        cache = self.layers[0].self_attn.cache
        if cache is not None and cache.k.shape[0] == batch_size and cache.k.shape[2] >= max_len:
            return cache.k.shape[2]
        for layer in self.layers:
            layer.self_attn.cache = KVCache(batch_size, max_len, a.n_kv_heads, a.head_dim, attention_dtype(p), p.device)
        return max_len

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache = None

    @torch.no_grad()
    def fuse_projections(self, make_linear: Callable[[Tensor], nn.Module] | None = None) -> None:
        """For inference: every layer's q, k and v projections become one product, and so do gate and up, built
        by make_linear from the concatenated weights (default: a plain bias-free linear layer). Decoding one row
        is memory-bound, and fewer, larger products stream their weights faster. The separate weights are
        dropped, so the model no longer has HF's parameter names: do not save or train it after this."""
        make_linear = make_linear or _linear_with_weight
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = make_linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            mlp.gate_up_proj = make_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj


def _linear_with_weight(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight)
    return linear


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h @ weight.T over the labels that are not -100, with the gradients
    worked out in the forward pass. Only supervised positions are projected at all: the others (prompt, padding)
    have no loss, so their logits would be thrown away and their gradient is zero. Those positions go a chunk at
    a time, so the fp32 (tokens, vocab) logits never exist whole; no logits are kept for backward and the output
    projection is not recomputed: backward only scales the stored gradients (the loss is a sum, so
    d loss / d logits = softmax - one_hot)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        want_grads, want_weight_grad = any(ctx.needs_input_grad[:2]), ctx.needs_input_grad[1]
        # -100 is IGNORE_INDEX in data.py and PyTorch's default ignore_index. On CUDA, nonzero waits for the
        # forward to finish (one sync per micro-batch); the backward's work is queued right after.
        supervised = (labels != -100).nonzero().squeeze(1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if want_grads else None
        grad_weight = torch.zeros_like(weight) if want_weight_grad and len(supervised) == 0 else None
        for rows in supervised.split(chunk):
            h_chunk, target = h[rows], labels[rows, None]
            log_probs = F.linear(h_chunk, weight).log_softmax(dim=-1, dtype=torch.float32)
            total -= log_probs.gather(1, target).sum()
            if want_grads:
                grad = log_probs.exp_()
                grad.scatter_add_(1, target, torch.full_like(grad[:, :1], -1.0))
                grad = grad.to(h.dtype)
                grad_h[rows] = grad @ weight
                if want_weight_grad:  # not for a frozen output layer (LoRA)
                    part = grad.T @ h_chunk
                    # One chunk (the usual case) is the gradient as it is; several add up in fp32.
                    grad_weight = part if grad_weight is None else grad_weight.float().add_(part)
        if want_grads:
            ctx.save_for_backward(grad_h, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_output
        return grad_h * grad_output, grad_weight, None, None


def chunked_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk: int = 4096) -> Tensor:
    return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk)


def document_mask(document_ids: Tensor) -> Tensor:
    """Causal attention mask (B, 1, T, T) that never crosses a document boundary in packed rows."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_doc)[:, None]


def count_parameters(args: ModelArgs) -> int:
    with torch.device("meta"):
        model = Transformer(args)
    return sum(p.numel() for p in model.parameters())


def training_flops(args: ModelArgs, seq_lens: list[int], n_supervised: int, frozen_weights: bool = False) -> float:
    """Training FLOPs (forward + backward = 3x forward) of sequences of these lengths that hold n_supervised
    supervised tokens: 6 per decoder matmul weight per token; 6 per output-projection weight per supervised token,
    the only logits the loss needs (and all that LinearCrossEntropy computes); and attention's QK^T and AV at
    6 * 2 * n_layers * seq_len * n_heads * head_dim per token, halved for causality (PaLM's count, with the causal
    half that SDPA skips). frozen_weights (LoRA): no weight gradients, so 4 per weight, and the adapters' own
    products (r / dim of the projections they sit on) are left out."""
    a, per_weight = args, 4 if frozen_weights else 6
    layer_weights = a.n_layers * (a.dim * a.head_dim * (a.n_heads * 2 + a.n_kv_heads * 2) + 3 * a.dim * a.hidden_dim)
    attention = sum(6 * a.n_layers * n * n * a.n_heads * a.head_dim for n in seq_lens)
    return per_weight * (layer_weights * sum(seq_lens) + a.dim * a.vocab_size * n_supervised) + attention


# ---------------------------------------------------------------------------------------------------------
# Checkpoint I/O


def add_pad_rows(weight: Tensor, rows: int) -> Tensor:
    """Grows an embedding or output matrix to `rows` rows; new rows are the mean of the existing ones."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)])


def meta_to_hf_qk(w: Tensor, n_heads: int) -> Tensor:
    """Permutes q/k rows from Meta's interleaved RoPE pairs to the rotate-half layout."""
    d, dim = w.shape
    return w.view(n_heads, d // n_heads // 2, 2, dim).transpose(1, 2).reshape(d, dim)


def hf_to_meta_qk(w: Tensor, n_heads: int) -> Tensor:
    d, dim = w.shape
    return w.view(n_heads, 2, d // n_heads // 2, dim).transpose(1, 2).reshape(d, dim)


# Meta name suffix -> (our name suffix, dim along which model-parallel shards are concatenated or None)
_META_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_META_TOP = {"tok_embeddings.weight": ("embed_tokens.weight", 1), "norm.weight": ("norm.weight", None)}
_META_TOP["output.weight"] = ("lm_head.weight", 0)


def _meta_name(name: str) -> tuple[str, int | None] | None:
    if name in _META_TOP:
        return _META_TOP[name]
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in _META_NAMES:
        ours, dim = _META_NAMES[parts[2]]
        return f"layers.{parts[1]}.{ours}", dim
    return None


def read_args(path: str) -> ModelArgs:
    """The model config of an HF (`config.json`) or Meta (`params.json`) checkpoint directory."""
    hf_config, meta_params = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if os.path.isfile(hf_config):
        config = _read_json(hf_config)
        try:
            return ModelArgs.from_hf_config(config)
        except KeyError as e:
            raise ValueError(f"{hf_config}: missing field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{hf_config}: {e}") from None
    if os.path.isfile(meta_params):
        params = _read_json(meta_params)
        vocab = params.get("vocab_size", -1)
        if vocab <= 0:  # LLaMA-1's params.json says -1: the tokenizer decides
            vocab = _sentencepiece_size(os.path.join(path, "tokenizer.model"), meta_params)
        try:
            return ModelArgs.from_meta_params(params, vocab)
        except KeyError as e:
            raise ValueError(f"{meta_params}: missing field {e.args[0]!r}") from None
    raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _sentencepiece_size(tokenizer_path: str, params_path: str) -> int:
    from sentencepiece import SentencePieceProcessor

    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{params_path}: vocab_size is -1 and {tokenizer_path} is missing")
    return SentencePieceProcessor(model_file=tokenizer_path).vocab_size()


def iter_checkpoint(path: str, args: ModelArgs, read_data: bool = True) -> Iterator[tuple[str, Tensor]]:
    """Yields (our parameter name, CPU tensor) one tensor at a time, so a caller can place each tensor
    where it belongs (or shard it) before the next is read: never two copies of the model in memory.
    With read_data=False the tensors are on the meta device, from the file headers alone: every name and
    shape (and a truncated file) can be checked in a second at any model size, before anything slow runs."""
    files = sorted(os.listdir(path))
    safetensors = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    meta = [f for f in files if f.startswith("consolidated.") and f.endswith(".pth")]
    if os.path.isfile(os.path.join(path, "config.json")) and (safetensors or bins):
        if safetensors:
            files = _shard_files(path, safetensors, "model.safetensors.index.json")
            yield from _iter_safetensors(path, files, read_data)
        else:
            yield from _iter_bins(path, _shard_files(path, bins, "pytorch_model.bin.index.json"), read_data)
    elif os.path.isfile(os.path.join(path, "params.json")) and meta:
        yield from _iter_meta(path, meta, args, read_data)
    else:
        raise FileNotFoundError(
            f"{path}: no weights found (model*.safetensors, pytorch_model*.bin or consolidated.*.pth)"
        )


def _shard_files(path: str, found: list[str], index_name: str) -> list[str]:
    index_path = os.path.join(path, index_name)
    if not os.path.isfile(index_path):
        return found
    wanted = sorted(set(_read_json(index_path)["weight_map"].values()))
    for f in wanted:
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"{index_path}: lists {f}, which is missing")
    return wanted


def _hf_name(name: str) -> str | None:
    """HF LlamaForCausalLM key -> ours; None for keys that carry no weights we use (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name.removeprefix("model.")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _iter_safetensors(path: str, files: list[str], read_data: bool) -> Iterator[tuple[str, Tensor]]:
    for f in files:
        yield from _read_safetensors(os.path.join(path, f), read_data)


def _read_safetensors(file_path: str, read_data: bool) -> Iterator[tuple[str, Tensor]]:
    """Reads each tensor straight into fresh memory with readinto. The format is an 8-byte header length, a
    JSON header of {name: {dtype, shape, data_offsets}}, then the data. Not memory-mapping the file matters:
    mapped pages count as resident on top of the copies, which would double peak memory while loading."""
    size = os.path.getsize(file_path)
    with open(file_path, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file_path}: not a safetensors file ({e})") from None
        data_start = 8 + header_len
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ValueError(f"{file_path}: truncated: tensor {key!r} ends at byte {data_start + end} of {size}")
            name = _hf_name(key)
            if name is None:
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file_path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            device = "cpu" if read_data else "meta"
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device=device)
            if tensor.numel() * tensor.element_size() != end - begin:
                raise ValueError(f"{file_path}: tensor {key!r}: {end - begin} bytes for shape {info['shape']}")
            if read_data:
                f.seek(data_start + begin)
                f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            yield name, tensor


def _iter_bins(path: str, files: list[str], read_data: bool) -> Iterator[tuple[str, Tensor]]:
    for f in files:
        state = _torch_load(os.path.join(path, f))
        for key in list(state):
            tensor = state.pop(key)  # drop our reference as we go: peak memory stays one shard file
            if (name := _hf_name(key)) is not None:
                yield name, tensor if read_data else tensor.to("meta")  # memory-mapped: to("meta") reads nothing


def _torch_load(file_path: str) -> dict[str, Tensor]:
    try:
        # weights_only: a checkpoint is data, and must never be allowed to run pickled code.
        return torch.load(file_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file_path}: not a weights-only PyTorch checkpoint ({first_line})") from None


def _iter_meta(path: str, files: list[str], args: ModelArgs, read_data: bool) -> Iterator[tuple[str, Tensor]]:
    # Model-parallel shards split some tensors across files; mmap keeps all shards open without reading them.
    shards = [_torch_load(os.path.join(path, f)) for f in files]
    for key in list(shards[0]):
        mapped = _meta_name(key)
        if mapped is None:
            continue  # e.g. rope.freqs, which we compute
        name, cat_dim = mapped
        parts = [shard.pop(key) if read_data else shard.pop(key).to("meta") for shard in shards]
        tensor = parts[0] if cat_dim is None or len(parts) == 1 else torch.cat(parts, dim=cat_dim)
        if name.endswith("q_proj.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_kv_heads)
        yield name, tensor


def check_shape(name: str, tensor: Tensor, expected: torch.Size | tuple, source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the config expects {tuple(expected)}"
        )


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
) -> Transformer:
    """Loads an HF or Meta LLaMA directory. The model is built on the meta device and each tensor is
    moved straight into place, so peak memory is one model plus one tensor. `vocab_size` larger than the
    checkpoint's (for the added `[PAD]`) grows the embeddings with mean rows."""
    args = read_args(path)
    checkpoint_vocab = args.vocab_size
    if vocab_size is not None and vocab_size != args.vocab_size:
        if vocab_size < args.vocab_size:
            raise ValueError(f"{path}: vocab_size {vocab_size} is smaller than the checkpoint's {args.vocab_size}")
        args.vocab_size = vocab_size
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())
    loaded = set()
    for name, tensor in iter_checkpoint(path, args):
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a LLaMA model")
        if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] == checkpoint_vocab:
            tensor = add_pad_rows(tensor, args.vocab_size)
        check_shape(name, tensor, expected[name].shape, path)
        module_name, _, attr = name.rpartition(".")
        tensor = tensor.to(device=device, dtype=dtype)  # no copy if already right: memory-mapped .bin stays so
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor))
        loaded.add(name)
    tied_head = {"lm_head.weight"} if args.tie_word_embeddings else set()
    missing = [n for n in expected if n not in loaded | tied_head]
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def save_hf_checkpoint(
    out_dir: str,
    args: ModelArgs,
    tensors: Iterable[tuple[str, Tensor]],
    tokenizer_path: str | None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Writes an HF LLaMA directory (config.json, safetensors shards with an index past one shard, and the
    tokenizer files) from (our name, tensor) pairs, streamed: only one shard is held at a time."""
    os.makedirs(out_dir, exist_ok=True)
    shard: dict[str, Tensor] = {}
    shard_bytes, shard_files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        tmp_name = f"model-{len(shard_files) + 1:05d}.safetensors.tmp"
        save_file(shard, os.path.join(out_dir, tmp_name), metadata={"format": "pt"})
        shard_files.append((tmp_name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        key = name if name == "lm_head.weight" else f"model.{name}"
        shard[key] = tensor
        shard_bytes += size
    if shard or not shard_files:
        flush()

    for f in os.listdir(out_dir):  # shards of an earlier export here would be mixed with ours
        if f.startswith("model") and f.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, f))
    n = len(shard_files)
    for i, (tmp_name, keys) in enumerate(shard_files, start=1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
        weight_map.update({k: final for k in keys})
    if n > 1:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    _write_json(os.path.join(out_dir, "config.json"), args.to_hf_config(dtype))
    _write_json(
        os.path.join(out_dir, "generation_config.json"),
        {
            "bos_token_id": args.bos_token_id,
            "eos_token_id": args.eos_token_id,
            "pad_token_id": args.pad_token_id,
        },
    )
    if tokenizer_path is not None:
        save_tokenizer_files(out_dir, tokenizer_path, args)


def save_tokenizer_files(out_dir: str, tokenizer_path: str, args: ModelArgs) -> None:
    """tokenizer.model plus the config that makes HF's LlamaTokenizer add BOS and know `[PAD]`."""
    if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.max_seq_len,
        **special,
    }
    if args.pad_token_id is not None and args.pad_token_id >= 0:
        config["pad_token"] = "[PAD]"
        special["pad_token"] = "[PAD]"
        config["added_tokens_decoder"] = {
            str(args.pad_token_id): {
                "content": "[PAD]",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

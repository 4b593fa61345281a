"""LLaMA: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention and a KV cache; the training loss and
its FLOP count. Reading and writing checkpoints is checkpoint.py's job.

Parameter names are those of Hugging Face's LlamaForCausalLM without its `model.` prefix, and RoPE uses the
rotate-half layout of HF-converted weights, so that an HF directory maps onto this model name for name.
"""

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


PRESETS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
}


def cap_cpu_kernel_caches() -> None:
    """oneDNN, and ideep (PyTorch's layer over it), keep the CPU matmul kernels they build for each new input
    shape, up to 1024 each at a few MB apiece, so memory grows with every new batch or prompt length. Both are
    capped at 64 here, unless set in the environment already. They are read when the first such matmul runs,
    so call this before it."""
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
    """fp32 on the CPU, whatever the weights: there PyTorch's bf16 attention is slower than fp32 (BENCHMARKS.md),
    and fp32 is the more exact. Elsewhere x's dtype."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


class KVCache(nn.Module):
    """Preallocated keys and values (rows, n_kv_heads, slots, head_dim), so that nothing is reallocated while
    decoding. Each row of a batch writes its new keys and values at its own slots: rows decode side by side at
    different lengths."""

    def __init__(self, rows: int, slots: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (rows, n_kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor, used: int, first_row: int) -> tuple[Tensor, Tensor]:
        """Writes k and v (B, n_kv_heads, T, head_dim) at slots (B, T) of cache rows first_row..first_row+B-1, and
        returns a view of those rows' first `used` slots."""
        rows = slice(first_row, first_row + k.shape[0])
        index = torch.arange(rows.start, rows.stop, device=k.device)
        self.k[index[:, None], :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[index[:, None], :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[rows, :, :used], self.v[rows, :, :used]


class Attention(nn.Module):
    def __init__(self, model_args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = model_args.n_heads, model_args.n_kv_heads, model_args.head_dim
        self.q_proj = nn.Linear(model_args.dim, model_args.n_heads * model_args.head_dim, bias=False)
        self.k_proj = nn.Linear(model_args.dim, model_args.n_kv_heads * model_args.head_dim, bias=False)
        self.v_proj = nn.Linear(model_args.dim, model_args.n_kv_heads * model_args.head_dim, bias=False)
        self.o_proj = nn.Linear(model_args.n_heads * model_args.head_dim, model_args.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one product: see Transformer.fuse_projections
        self.cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache_slots: Tensor | None,
        first_row: int,
        tokens_at: Tensor | None,
    ):
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        if tokens_at is not None:  # x holds only the real tokens: attention needs them in their rows
            q, k, v = (unpack(t, tokens_at) for t in (q, k, v))
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dtype = attention_dtype(x)
        if cache_slots is not None:
            k, v = self.cache.update(cache_slots, k, v, mask.shape[-1], first_row)
        y = F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # fmt: skip
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if tokens_at is None else y[tokens_at][None])


def unpack(x: Tensor, tokens_at: Tensor) -> Tensor:
    """x (1, N, C), the real tokens of a batch packed in order, back in their places in the batch (B, T, C), as
    tokens_at (B, T) marks them; zeros elsewhere."""
    batch = x.new_zeros(*tokens_at.shape, x.shape[-1])
    batch[tokens_at] = x[0]
    return batch


class MLP(nn.Module):
    def __init__(self, model_args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(model_args.dim, model_args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(model_args.dim, model_args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(model_args.hidden_dim, model_args.dim, bias=False)
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
    def __init__(self, model_args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(model_args.dim, model_args.norm_eps)
        self.self_attn = Attention(model_args)
        self.post_attention_layernorm = RMSNorm(model_args.dim, model_args.norm_eps)
        self.mlp = MLP(model_args)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache_slots: Tensor | None,
        first_row: int,
        tokens_at: Tensor | None,
    ):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_slots, first_row, tokens_at)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, model_args: ModelArgs):
        super().__init__()
        self.model_args = model_args
        embedding = torch.empty(model_args.vocab_size, model_args.dim)
        if embedding.device.type != "meta":  # normal_ on the meta device imports torch._dynamo: a second for nothing
            nn.init.normal_(embedding)
        self.embed_tokens = nn.Embedding(model_args.vocab_size, model_args.dim, _weight=embedding)
        self.layers = nn.ModuleList(Block(model_args) for _ in range(model_args.n_layers))
        self.norm = RMSNorm(model_args.dim, model_args.norm_eps)
        self.lm_head = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        if model_args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache_slots: Tensor | None = None,
        labels: Tensor | None = None,
        first_row: int = 0,
        tokens_at: Tensor | None = None,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or with `labels` the summed cross-entropy over labels that
        are not -100 (labels are already aligned with the logits: shift before calling).

        positions (B, T): RoPE positions, default 0..T-1; restart them per document for packed rows.
        mask: boolean, broadcastable to (B, 1, T, S), True where a query may attend a key; default causal.
        cache_slots (B, T): with a KV cache set up, the cache slots each row's new keys go to; S is then the
        mask's last dimension, the number of cache slots read (default: up to the last slot written, causal).
        first_row: the batch's rows use cache rows first_row..first_row+B-1.
        tokens_at (B, T): True at the real tokens of rows right-padded to T (a mix of one-token decoding rows and
        prompt chunks): the linear layers then run on those tokens alone, not on the padding.
        logits_at (B,): only the logits at this position of each row, (B, 1, vocab): the others would be thrown
        away, and the output layer is a large share of a small model.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        if cache_slots is not None and mask is None:
            used = torch.arange(int(cache_slots.max()) + 1, device=tokens.device)
            mask = (used <= cache_slots[..., None])[:, None]
        h = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.model_args.head_dim, self.model_args.rope_theta, h.dtype)
        if tokens_at is not None:
            h = h[tokens_at][None]
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache_slots, first_row, tokens_at)
        if tokens_at is not None:
            h = unpack(h, tokens_at)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at][:, None]
        h = self.norm(h)
        if labels is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h, self.lm_head.weight, labels)

    def setup_cache(self, rows: int, slots: int) -> None:
        """A KV cache of rows x slots for every layer, in the dtype attention runs in. The cache the model has is
        kept when it has that shape: a compiled decoding step is specialised to its buffers and would compile
        again for new ones."""
        p, a = self.embed_tokens.weight, self.model_args
        cache = self.layers[0].self_attn.cache
        if cache is not None and cache.k.shape[0] == rows and cache.k.shape[2] == slots:
            return
        self.clear_cache()  # the old cache's memory is free before the new one is allocated
        for layer in self.layers:
            layer.self_attn.cache = KVCache(rows, slots, a.n_kv_heads, a.head_dim, attention_dtype(p), p.device)

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


def count_parameters(model_args: ModelArgs) -> int:
    with torch.device("meta"):
        model = Transformer(model_args)
    return sum(p.numel() for p in model.parameters())


def training_flops(
    model_args: ModelArgs, seq_lens: list[int], n_supervised: int, frozen_weights: bool = False
) -> float:
    """Training FLOPs (forward + backward = 3x forward) of sequences of these lengths that hold n_supervised
    supervised tokens: 6 per decoder matmul weight per token; 6 per output-projection weight per supervised token,
    the only logits the loss needs (and all that LinearCrossEntropy computes); and attention's QK^T and AV at
    6 * 2 * n_layers * seq_len * n_heads * head_dim per token, halved for causality (PaLM's count, with the causal
    half that SDPA skips). frozen_weights (LoRA): no weight gradients, so 4 per weight, and the adapters' own
    products (r / dim of the projections they sit on) are left out."""
    a, per_weight = model_args, 4 if frozen_weights else 6
    layer_weights = a.n_layers * (a.dim * a.head_dim * (a.n_heads * 2 + a.n_kv_heads * 2) + 3 * a.dim * a.hidden_dim)
    attention = sum(6 * a.n_layers * n * n * a.n_heads * a.head_dim for n in seq_lens)
    return per_weight * (layer_weights * sum(seq_lens) + a.dim * a.vocab_size * n_supervised) + attention

"""The random LLaMA the decoding and serving benches build with transformers: LLaMA's proportions (heads of 64,
SwiGLU width 2/3 of 4 x dim rounded up to 256) at any size, LLaMA's 32000-piece vocabulary."""

from transformers import LlamaConfig


def llama_config(dim: int, n_layers: int, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=dim,
        intermediate_size=256 * -(-int(dim * 8 / 3) // 256),
        num_hidden_layers=n_layers,
        num_attention_heads=dim // 64,
        vocab_size=32000,
        max_position_embeddings=max_positions,
    )

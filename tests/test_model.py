"""model.py against transformers' LlamaForCausalLM (the independent reference) on tiny random configs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import hf_to_meta_qk
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from checkpoint import add_pad_rows, args_from_hf_config, hf_config, load_model, read_model_args, save_hf_checkpoint
from model import ModelArgs, Transformer, chunked_cross_entropy, count_parameters, document_mask

CONFIGS = {
    "mha-theta1e4-untied-oddvocab": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=101, rope_theta=1e4, tie_word_embeddings=False,
    ),
    "gqa-theta5e5-tied": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=256, rope_theta=5e5, tie_word_embeddings=True,
    ),
    "mqa-theta1e4-tied-oddvocab": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=1,
        vocab_size=77, rope_theta=1e4, tie_word_embeddings=True,
    ),
    "gqa-theta5e5-untied-headdim": dict(
        hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=131, rope_theta=5e5, tie_word_embeddings=False,
    ),
}  # fmt: skip


def random_hf_model(config: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF inits norms to 1: perturb them so the norm weights are really tested
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model: Transformer, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, **kwargs)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_both_ways(name, tmp_path, tokenizer_model):
    config = CONFIGS[name]
    ref = random_hf_model(config)
    ref.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))

    ours = load_model(str(tmp_path / "hf"))
    assert ours.model_args.tie_word_embeddings == config["tie_word_embeddings"]
    assert (our_logits(ours, tokens) - hf_logits(ref, tokens)).abs().max() <= 1e-5

    save_hf_checkpoint(
        str(tmp_path / "ours"), ours.model_args, ours.named_parameters(), str(tokenizer_model), torch.float32
    )
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (hf_logits(back, tokens) - our_logits(ours, tokens)).abs().max() <= 1e-5

    ours.fuse_projections()  # one product for q, k, v and one for gate, up (generate.py's CPU layout)
    assert not any(hasattr(layer.self_attn, "q_proj") or hasattr(layer.mlp, "up_proj") for layer in ours.layers)
    assert (our_logits(ours, tokens) - hf_logits(ref, tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(name, tmp_path):
    """bf16 rounds differently from transformers' bf16 (attention runs in fp32 on the CPU), so both are measured
    against the fp32 logits: ours must be as close as transformers' bf16 model is, and agree on the argmax."""
    config = CONFIGS[name]
    random_hf_model(config).save_pretrained(tmp_path)
    exact = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_model(str(tmp_path), dtype=torch.bfloat16)
    tokens = torch.randint(0, config["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(exact, tokens)
    ours_bf16, ref_bf16 = our_logits(ours, tokens).float(), hf_logits(ref, tokens).float()
    assert (ours_bf16 - expected).abs().mean() <= 1.2 * (ref_bf16 - expected).abs().mean()
    assert (ours_bf16.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.97


@pytest.fixture(scope="module")
def gqa_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=96, vocab_size=97))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_right_padding_is_exact(gqa_model):
    lengths = [13, 30, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    batch = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    logits = our_logits(gqa_model, batch)
    for i, s in enumerate(seqs):
        alone = our_logits(gqa_model, s[None])[0]
        assert (logits[i, : len(s)] - alone).abs().max() <= 1e-5


def test_packed_documents_are_exact(gqa_model):
    docs = [torch.randint(0, 97, (n,)) for n in (11, 25, 9)]
    row = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = our_logits(gqa_model, row, positions=positions, mask=document_mask(document_ids))[0]
    start = 0
    for d in docs:
        alone = our_logits(gqa_model, d[None])[0]
        assert (logits[start : start + len(d)] - alone).abs().max() <= 1e-5
        start += len(d)


def test_kv_cache_decoding_matches_full_forward(gqa_model):
    tokens = torch.randint(0, 97, (2, 40))
    full = our_logits(gqa_model, tokens)
    prompt = 8
    gqa_model.setup_cache(rows=2, slots=64)
    try:
        steps = [our_logits(gqa_model, tokens[:, :prompt], cache_slots=torch.arange(prompt).expand(2, -1))]
        for t in range(prompt, prompt + 32):
            pos = torch.tensor([[t], [t]])
            steps.append(our_logits(gqa_model, tokens[:, t : t + 1], positions=pos, cache_slots=pos))
    finally:
        gqa_model.clear_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_preset_parameter_counts():
    assert count_parameters(ModelArgs.from_name("7B")) == 6_738_415_616
    assert count_parameters(ModelArgs.from_name("13B")) == 13_015_864_320


@pytest.mark.parametrize("chunk", [4096, 7])
def test_fused_loss_matches_cross_entropy_and_its_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 50, 64, requires_grad=True)
    weight = torch.randn(97, 64, requires_grad=True)
    labels = torch.randint(0, 97, (3, 50))
    labels[:, :10] = -100
    expected = torch.nn.functional.cross_entropy((h @ weight.T).reshape(-1, 97), labels.reshape(-1), reduction="sum")
    grads = torch.autograd.grad(3 * expected, (h, weight))
    loss = chunked_cross_entropy(h, weight, labels, chunk)
    assert torch.allclose(loss, expected, rtol=1e-6)
    for ours, reference in zip(torch.autograd.grad(3 * loss, (h, weight)), grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)  # fp32, summed in another order


def test_fused_loss_without_supervised_tokens_is_zero():
    h, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    loss = chunked_cross_entropy(h, weight, torch.full((2, 5), -100))
    assert loss.item() == 0
    assert all(not g.any() for g in torch.autograd.grad(loss, (h, weight)))


def write_meta_checkpoint(model: Transformer, out_dir, n_shards: int) -> None:
    """Meta's layout: interleaved q/k, Meta names, tensors split over model-parallel shards."""
    a = model.model_args
    state = {"tok_embeddings.weight": (model.embed_tokens.weight, 1), "norm.weight": (model.norm.weight, None)}
    state["output.weight"] = (model.lm_head.weight, 0)
    for i, layer in enumerate(model.layers):
        at, mlp = layer.self_attn, layer.mlp
        state |= {
            f"layers.{i}.attention.wq.weight": (hf_to_meta_qk(at.q_proj.weight, a.n_heads), 0),
            f"layers.{i}.attention.wk.weight": (hf_to_meta_qk(at.k_proj.weight, a.n_kv_heads), 0),
            f"layers.{i}.attention.wv.weight": (at.v_proj.weight, 0),
            f"layers.{i}.attention.wo.weight": (at.o_proj.weight, 1),
            f"layers.{i}.feed_forward.w1.weight": (mlp.gate_proj.weight, 0),
            f"layers.{i}.feed_forward.w2.weight": (mlp.down_proj.weight, 1),
            f"layers.{i}.feed_forward.w3.weight": (mlp.up_proj.weight, 0),
            f"layers.{i}.attention_norm.weight": (layer.input_layernorm.weight, None),
            f"layers.{i}.ffn_norm.weight": (layer.post_attention_layernorm.weight, None),
        }
    os.makedirs(out_dir)
    for shard in range(n_shards):
        part = {
            k: (w if dim is None else w.chunk(n_shards, dim=dim)[shard]).detach().clone()
            for k, (w, dim) in state.items()
        }
        part["rope.freqs"] = torch.zeros(a.head_dim // 2)
        torch.save(part, os.path.join(out_dir, f"consolidated.{shard:02d}.pth"))
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, multiple_of=32)
    params |= dict(norm_eps=a.norm_eps, vocab_size=a.vocab_size, rope_theta=a.rope_theta)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_loads_with_permuted_qk(n_shards, tmp_path):
    # Meta's FFN width for dim 64, multiple_of 32: 2/3 * 256 = 170 -> 192.
    torch.manual_seed(3)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192, vocab_size=96))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    write_meta_checkpoint(model, tmp_path / "meta", n_shards)
    loaded = load_model(str(tmp_path / "meta"))
    assert loaded.model_args.hidden_dim == 192
    tokens = torch.randint(0, 96, (2, 30))
    assert (our_logits(loaded, tokens) - our_logits(model.eval(), tokens)).abs().max() <= 1e-5


def test_sharded_save_round_trip(tmp_path, tokenizer_model):
    ref = random_hf_model(CONFIGS["gqa-theta5e5-untied-headdim"])
    ref.save_pretrained(tmp_path / "hf")
    ours = load_model(str(tmp_path / "hf"))
    out = tmp_path / "sharded"
    save_hf_checkpoint(str(out), ours.model_args, ours.named_parameters(), str(tokenizer_model), torch.float32, 20_000)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    again = load_model(str(out))
    tokens = torch.randint(0, 131, (2, 20))
    assert torch.equal(our_logits(again, tokens), our_logits(ours, tokens))
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (hf_logits(back, tokens) - our_logits(ours, tokens)).abs().max() <= 1e-5


def test_pytorch_bin_checkpoint_loads(tmp_path):
    ref = random_hf_model(CONFIGS["mha-theta1e4-untied-oddvocab"])
    ref.config.save_pretrained(tmp_path)  # transformers 5 only writes safetensors: write the .bin as v4 did
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    tokens = torch.randint(0, 101, (2, 16))
    assert (our_logits(load_model(str(tmp_path)), tokens) - hf_logits(ref, tokens)).abs().max() <= 1e-5


def test_pad_token_rows_are_the_mean(tmp_path):
    ref = random_hf_model(CONFIGS["mha-theta1e4-untied-oddvocab"])
    ref.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), vocab_size=102)
    pairs = [(model.embed_tokens.weight, ref.model.embed_tokens.weight), (model.lm_head.weight, ref.lm_head.weight)]
    for weight, original in pairs:
        assert weight.shape == (102, 64)
        assert torch.equal(weight[:101], original)
        assert torch.allclose(weight[101], original.mean(0), atol=1e-7)
    assert add_pad_rows(ref.lm_head.weight, 101) is ref.lm_head.weight


def test_config_weight_mismatch_names_tensor_and_shapes(tmp_path):
    random_hf_model(CONFIGS["mha-theta1e4-untied-oddvocab"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        load_model(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    shapes = ("(64, 160)", "(64, 128)") if "down_proj" in message else ("(160, 64)", "(128, 64)")
    assert "mlp." in message and all(shape in message for shape in shapes)


def test_truncated_safetensors_is_reported(tmp_path):
    random_hf_model(CONFIGS["mha-theta1e4-untied-oddvocab"]).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_model(str(tmp_path))


def test_read_args_presets_round_trip():
    args = ModelArgs.from_name("7B")
    assert args_from_hf_config(hf_config(args, torch.bfloat16)) == args


MEMORY_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch, model, checkpoint
def status_kb(field):  # VmHWM starts afresh at exec; ru_maxrss would inherit the parent's (pytest's) peak
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
# The first model built on the meta device imports torch's meta kernels (~75 MB, once per process): that
# is interpreter footprint, not loading, so it goes in the baseline.
with torch.device("meta"):
    model.Transformer(model.ModelArgs(dim=64, n_layers=1, n_heads=4, hidden_dim=128, vocab_size=100))
baseline = status_kb("VmHWM")
m = checkpoint.load_model({path!r})
print(baseline, status_kb("VmHWM"))
"""


def test_loading_memory_is_one_model(tmp_path):
    """Loading peaks at about one copy of the weights above the interpreter's own footprint."""
    args = ModelArgs(dim=512, n_layers=12, n_heads=8, hidden_dim=1536, vocab_size=8000)
    torch.manual_seed(0)
    model = Transformer(args)
    save_hf_checkpoint(str(tmp_path), args, model.named_parameters(), None, torch.float32, 100 * 1000**2)
    size = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    del model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = MEMORY_SCRIPT.format(root=root, path=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    baseline_kb, peak_kb = map(int, out.split())
    assert (peak_kb - baseline_kb) * 1024 <= 1.3 * size, (baseline_kb, peak_kb, size)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_model_args(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["mha-theta1e4-untied-oddvocab"]))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_model(str(tmp_path))
    shutil.rmtree(tmp_path)

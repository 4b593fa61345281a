"""weight_diff.py against stanford_alpaca's weight_diff.py, whose steps are restated below with transformers: a diff
made the original's way recovers with ours and ours the original's way; our checksum catches a wrong base model or a
damaged diff, and then nothing is left that looks recovered."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import weight_diff
from checkpoint import load_model

# ---------------------------------------------------------------------------------------------------------
# stanford_alpaca's steps, with transformers: both models loaded whole in fp32; the raw tokenizer given a
# "[PAD]" token and raw's embeddings a row for it, set to the mean of the other rows (its train.py's
# smart_tokenizer_and_embedding_resize); diff = tuned - raw and recovered = diff + raw, key by key over the
# state dicts; the diff saved with the tuned model's tokenizer; recover's naive check of the sum of all weights
# against Alpaca 7B's.


def load_original_way(path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def add_pad_original_way(model, tokenizer) -> None:
    added = tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model.resize_token_embeddings(len(tokenizer))
    if added:
        for rows in (model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data):
            rows[-added:] = rows[:-added].mean(dim=0, keepdim=True)


@torch.inference_mode()
def original_make_diff(path_raw, path_tuned, path_diff) -> None:
    tuned, tuned_tokenizer = load_original_way(path_tuned)
    raw, raw_tokenizer = load_original_way(path_raw)
    if raw_tokenizer.pad_token is None:
        add_pad_original_way(raw, raw_tokenizer)
    tuned_state, raw_state = tuned.state_dict(), raw.state_dict()
    for key in tuned_state:
        tuned_state[key].add_(-raw_state[key])
    tuned.save_pretrained(path_diff)
    tuned_tokenizer.save_pretrained(path_diff)


@torch.inference_mode()
def original_recover(path_raw, path_diff, check_integrity_naively=True) -> torch.nn.Module:
    raw, raw_tokenizer = load_original_way(path_raw)
    recovered, _ = load_original_way(path_diff)
    if raw_tokenizer.pad_token is None:
        add_pad_original_way(raw, raw_tokenizer)
    recovered_state, raw_state = recovered.state_dict(), raw.state_dict()
    for key in recovered_state:
        recovered_state[key].add_(raw_state[key])
    if check_integrity_naively:
        total = sum(recovered_state[key].sum() for key in recovered_state)
        assert torch.allclose(total, torch.full_like(total, 50637.1836), atol=1e-2, rtol=0), "Naive integrity check"
    return recovered


# ---------------------------------------------------------------------------------------------------------


def state(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def assert_close_states(a: dict, b: dict, tol: float = 1e-6) -> None:
    """(tuned - raw) + raw is tuned to within fp32 rounding, not bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tol, key


def tokens() -> torch.Tensor:
    return torch.randint(0, 32001, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model, tokenizer_model) -> str:
    """What the original train.py leaves: raw with its [PAD] row, fine-tuned (here: moved at random), in fp32,
    with its tokenizer (and tokenizer.model, which the transformers of 2023 wrote too)."""
    model, tokenizer = load_original_way(tiny_model)
    add_pad_original_way(model, tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return str(path)


@pytest.fixture(scope="module")
def our_diff(tmp_path_factory, tiny_model, tuned) -> str:
    path = str(tmp_path_factory.mktemp("diffs") / "ours")
    weight_diff.main(["make_diff", "--path_raw", tiny_model, "--path_tuned", tuned, "--path_diff", path])
    return path


def as_bin_shards(path) -> None:
    """The diff as the transformers of 2023 saved it (the released Alpaca diff): pytorch_model-*.bin shards."""
    weights = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    keys, weight_map = sorted(weights), {}
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2 :]], start=1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: weights[k] for k in part}, os.path.join(path, name))
        weight_map |= dict.fromkeys(part, name)
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_a_diff_made_the_original_way_recovers_with_ours(tiny_model, tuned, tmp_path, capsys, layout):
    original = tmp_path / "diff"
    original_make_diff(tiny_model, tuned, original)
    if layout == "bin":
        as_bin_shards(original)
    out = tmp_path / "recovered"
    weight_diff.main(["recover", "--path_raw", tiny_model, "--path_diff", str(original), "--path_tuned", str(out)])
    assert "NOT verified" in capsys.readouterr().err
    assert_close_states(state(out), state(tuned))
    assert sorted(os.listdir(tmp_path)) == ["diff", "recovered"]


def test_our_diff_is_the_originals_and_recovers_the_original_way(tiny_model, tuned, our_diff, tmp_path):
    original = tmp_path / "original"
    original_make_diff(tiny_model, tuned, original)
    ours, theirs = load_file(os.path.join(our_diff, "model.safetensors")), load_file(original / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same fp32 subtraction, and the same mean for the [PAD] row
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], theirs[key]), key
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        with open(os.path.join(tuned, name), "rb") as a, open(os.path.join(our_diff, name), "rb") as b:
            assert a.read() == b.read(), name

    recovered = original_recover(tiny_model, our_diff, check_integrity_naively=False)
    assert_close_states(recovered.state_dict(), state(tuned))
    with pytest.raises(AssertionError, match="Naive integrity check"):  # Alpaca 7B's weight sum: no other model's
        original_recover(tiny_model, our_diff)


@pytest.mark.parametrize("max_shard_bytes", [weight_diff.MAX_SHARD_BYTES, 3_000_000], ids=["one_shard", "shards"])
def test_ours_both_ways_verified_and_loaded_by_transformers(tiny_model, tuned, tmp_path, capsys, max_shard_bytes):
    diff, out = str(tmp_path / "diff"), str(tmp_path / "out")
    weight_diff.make_diff(tiny_model, tuned, diff, max_shard_bytes=max_shard_bytes)
    weight_diff.recover(tiny_model, diff, out, max_shard_bytes=max_shard_bytes)
    assert f"all {len(state(tuned))} tensors match the diff's SHA-256" in capsys.readouterr().err
    if max_shard_bytes < weight_diff.MAX_SHARD_BYTES:
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))

    recovered, reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), load_original_way(tuned)[0]
    assert_close_states(recovered.state_dict(), reference.state_dict())
    with torch.no_grad():
        assert (recovered(tokens()).logits - reference(tokens()).logits).abs().max() <= 1e-5
        assert (load_model(out)(tokens()) - recovered(tokens()).logits).abs().max() <= 1e-5
    text = "Give three tips for staying healthy.[PAD]"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(tuned)(text).input_ids


@pytest.fixture(scope="module")
def other_raw(tmp_path_factory, tokenizer_model) -> str:
    """A base model of the same shape as tiny_model, with other weights."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("other_raw")
    LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512)
    ).save_pretrained(path)  # fmt: skip
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return str(path)


def flip_last_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))


def truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) - 100)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("wrong_raw", "does not match its SHA-256"),
        ("flipped_byte", "does not match its SHA-256"),
        ("truncated", "truncated"),
        ("checksums_of_another_model", "does not match its SHA-256"),
    ],
)
def test_a_wrong_raw_or_a_damaged_diff_is_one_line_and_leaves_nothing(
    tiny_model, tuned, other_raw, our_diff, tmp_path, capsys, damage, message
):
    diff = tmp_path / "diff"
    shutil.copytree(our_diff, diff)
    raw = other_raw if damage == "wrong_raw" else tiny_model
    if damage == "flipped_byte":
        flip_last_byte(diff / "model.safetensors")
    elif damage == "truncated":
        truncate(diff / "model.safetensors")
    elif damage == "checksums_of_another_model":
        shutil.rmtree(diff)
        weight_diff.make_diff(other_raw, tuned, str(diff))
        shutil.copyfile(os.path.join(our_diff, "model.safetensors"), diff / "model.safetensors")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        weight_diff.main(["recover", "--path_raw", raw, "--path_diff", str(diff), "--path_tuned", f"{tmp_path}/out"])
    error = str(exit.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert sorted(os.listdir(tmp_path)) == ["diff"]  # neither out nor out.partial


def test_test_inference_answers_as_transformers(tiny_model, our_diff, tmp_path, capsys):
    out = str(tmp_path / "out")
    weight_diff.main(["recover", "--path_raw", tiny_model, "--path_diff", our_diff, "--path_tuned", out,
                      "--test_inference"])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.startswith(f"Input: {weight_diff.TEST_PROMPT}\nCompletion: ")
    # transformers' greedy continuation of the same prompt on the recovered model, 100 tokens or up to EOS.
    model, tokenizer = load_original_way(out)
    # The tokenizer that transformers 5 saved from a bare tokenizer.model adds no BOS; the original's added one.
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<s>"), *tokenizer(weight_diff.TEST_PROMPT).input_ids]])
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=100, do_sample=False)[0, ids.shape[1] :]
    assert len(answer) == 100 or answer[-1] == tokenizer.eos_token_id
    expected = tokenizer.decode(answer, skip_special_tokens=True)
    assert printed.removeprefix(f"Input: {weight_diff.TEST_PROMPT}\nCompletion: ").rstrip("\n") == expected


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "required: {make_diff,recover}"),
        (["recover", "--path_diff", "d", "--path_tuned", "t"], "--path_raw"),
        (["recover", "--path_raw", "RAW", "--path_diff", "DIFF", "--path_tuned", "EXISTING"], "already exists"),
        (["make_diff", "--path_raw", "OTHER_SHAPE", "--path_tuned", "TUNED", "--path_diff", "NEW"], "dim 32"),
        (["recover", "--path_raw", "RAW", "--path_diff", "RAW", "--path_tuned", "NEW"], "32001 embedding rows"),
        (["recover", "--device", "tpu", "--path_raw", "RAW", "--path_diff", "DIFF", "--path_tuned", "NEW"], "tpu"),
    ],
)
def test_bad_usage_is_one_line(tiny_model, tuned, our_diff, tmp_path, args, message):
    other_shape = tmp_path / "other_shape"
    LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=32000)
    ).save_pretrained(other_shape)
    shutil.copyfile(os.path.join(tiny_model, "tokenizer.model"), other_shape / "tokenizer.model")
    os.makedirs(tmp_path / "existing")
    (tmp_path / "existing" / "model.safetensors").write_text("")
    paths = {"RAW": tiny_model, "DIFF": our_diff, "TUNED": tuned, "OTHER_SHAPE": str(other_shape),
             "EXISTING": str(tmp_path / "existing"), "NEW": str(tmp_path / "new")}  # fmt: skip
    with pytest.raises(SystemExit) as exit:
        weight_diff.main([paths.get(arg, arg) for arg in args])
    error = str(exit.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error, error
    assert not os.path.exists(tmp_path / "new")

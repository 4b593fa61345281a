"""LoRA against peft, the independent reference: our adapters load into peft's PeftModel with our logits, peft's
adapters load into ours with its logits, and merging an adapter into the base changes no output; then train.py's
LoRA path end to end on the CPU (1 against 2 processes, resume, the base untouched), generate.py and serve.py on
its output."""

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from conftest import CACHE, ROOT, assert_same_weights, common, metrics, run, weights
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

import serve
from checkpoint import adapter_config, load_adapter, load_model, save_adapter
from model import LORA_TARGETS, apply_lora, merge_lora

GENERATE = os.path.join(ROOT, "generate.py")

TARGET_SETS = [["q_proj", "v_proj"], list(LORA_TARGETS)]


def reference(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def trained_looking(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every adapter: B starts at zero, which would make any base-only model pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["q_v", "all"])
def test_our_adapter_loads_into_peft_with_our_logits(tiny_model, tmp_path, targets):
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=targets)
    trained_looking(ours)
    save_adapter(str(tmp_path), adapter_config(4, 8, 0.0, targets, tiny_model), ours.named_parameters())

    theirs = PeftModel.from_pretrained(reference(tiny_model), str(tmp_path)).eval()
    with torch.no_grad():
        assert (ours(tokens()) - theirs(tokens()).logits).abs().max() <= 1e-5
    # Every adapter tensor was taken: peft's own names for the loaded weights match ours one to one.
    peft_names = {n.replace(".default", "") for n, _ in theirs.named_parameters() if ".lora_" in n}
    assert peft_names == {"base_model.model.model." + n for n, _ in ours.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["q_v", "all"])
def test_peft_adapter_loads_into_ours_with_its_logits(tiny_model, tmp_path, targets):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=targets, init_lora_weights=False)
    theirs = get_peft_model(reference(tiny_model), config).eval()  # init_lora_weights=False: B is random too
    theirs.save_pretrained(tmp_path)

    ours = load_model(tiny_model)
    load_adapter(ours, str(tmp_path))
    with torch.no_grad():
        assert (ours(tokens()) - theirs(tokens()).logits).abs().max() <= 1e-5


def test_merged_equals_unmerged(tiny_model):
    ours = load_model(tiny_model)
    apply_lora(ours, r=8, alpha=16, dropout=0.05, targets=LORA_TARGETS)
    trained_looking(ours)
    ours.eval()
    with torch.no_grad():
        unmerged = ours(tokens())
        merge_lora(ours)
        merged = ours(tokens())
    assert not any(".lora_" in n for n, _ in ours.named_parameters())
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (merged - load_model(tiny_model)(tokens())).abs().max() > 1e-2  # the adapters did change the model


def test_adapter_for_another_base_is_one_clear_error(tiny_model, tmp_path):
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    adapters = [
        (n, torch.cat([p, p], dim=-1) if n.endswith("lora_A.weight") else p) for n, p in ours.named_parameters()
    ]
    save_adapter(str(tmp_path), adapter_config(4, 8, 0.0, ["q_proj", "v_proj"], "other"), adapters)
    with pytest.raises(
        ValueError,
        match=r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_at"
        r"tn.q_proj.lora_A.weight' has shape \(4, 128\) but the base model expects \(4, 64\)",
    ):
        load_adapter(load_model(tiny_model), str(tmp_path))


def test_unknown_target_module_is_one_clear_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target module 'qproj'"):
        apply_lora(load_model(tiny_model), r=4, alpha=8, dropout=0.0, targets=["qproj"])
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    save_adapter(str(tmp_path), adapter_config(4, 8, 0.0, ["q_proj", "lm_head"], "base"), ours.named_parameters())
    with pytest.raises(ValueError, match="adapter_config.json: target_modules must be a list of q_proj"):
        load_adapter(load_model(tiny_model), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# train.py --lora_r: end to end on the CPU

LORA = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--lora_target_modules", "[q_proj,v_proj]"]
FP32 = dict(per_device_train_batch_size=2, max_steps=6, bf16=False, learning_rate=1e-2)


def digest(path: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def adapters(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def fp32_runs(tiny_model, small_data, tmp_path_factory) -> dict:
    """Six fp32 steps of LoRA: one process (with the merged export), two processes (checkpoints at steps 3 and
    6), and two processes resumed from the latter's checkpoint-3. The base directory's files before it all."""
    root = tmp_path_factory.mktemp("lora_runs")
    base_files = digest(tiny_model)
    one = common(tiny_model, small_data, root / "one", gradient_accumulation_steps=4, save_merged=True, **FP32)
    run(one + LORA)
    two = common(tiny_model, small_data, root / "two", gradient_accumulation_steps=2, save_strategy="steps",
                 save_steps=3, **FP32)  # fmt: skip
    run(two + LORA, nproc=2)
    os.makedirs(root / "resumed")
    shutil.copytree(root / "two" / "checkpoint-3", root / "resumed" / "checkpoint-3")
    resumed = common(tiny_model, small_data, root / "resumed", gradient_accumulation_steps=2,
                     resume_from_checkpoint="latest", **FP32)  # fmt: skip
    run(resumed + LORA, nproc=2)
    return {"root": root, "base_files": base_files}


def test_lora_two_processes_match_one_process(fp32_runs):
    root = fp32_runs["root"]
    for a, b in zip(metrics(root / "one"), metrics(root / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    one, two = adapters(root / "one"), adapters(root / "two")
    assert len(one) == 2 * 2 * 2  # 2 layers x q, v x A, B
    assert all(one[k].abs().max() > 0 for k in one if "lora_B" in k)  # trained away from B = 0
    assert_same_weights(one, two, 1e-5, order_changed=True)


def test_lora_checkpoints_hold_only_adapters_and_resume_matches(fp32_runs):
    root = fp32_runs["root"]
    index = FileSystemReader(str(root / "two" / "checkpoint-3")).read_metadata().state_dict_metadata
    assert index and all(".lora_" in key for key in index), sorted(index)
    steps = metrics(root / "resumed")
    assert [m["step"] for m in steps] == [4, 5, 6]
    for a, b in zip(metrics(root / "two")[3:], steps, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert_same_weights(adapters(root / "two"), adapters(root / "resumed"), 1e-6)


def test_resuming_with_another_lora_alpha_is_one_line(fp32_runs, tiny_model, small_data, tmp_path):
    checkpoint = str(fp32_runs["root"] / "two" / "checkpoint-3")
    flags = common(tiny_model, small_data, tmp_path, gradient_accumulation_steps=4, resume_from_checkpoint=checkpoint,
                   **FP32)  # fmt: skip
    result = run(flags + LORA[:2] + ["--lora_alpha", "32"] + LORA[4:], check=False)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "checkpoint-3: trained with --lora_alpha 8.0; this launch has --lora_r 4 --lora_alpha 32.0" in result.stderr


def test_lora_leaves_the_base_bit_identical(fp32_runs, tiny_model):
    """The base directory is never written, and the merged export holds every base tensor bit for bit except
    the adapted ones, which are the base plus B A alpha/r."""
    root = fp32_runs["root"]
    assert digest(tiny_model) == fp32_runs["base_files"]
    base, merged = load_file(os.path.join(tiny_model, "model.safetensors")), weights(root / "one" / "merged")
    lora = {k.removeprefix("base_model.model."): v for k, v in adapters(root / "one").items()}
    assert base.keys() == merged.keys()
    for name in base:
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            module = name.removesuffix(".weight")
            delta = lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"] * 8 / 4
            assert (merged[name] - base[name] - delta).abs().max() <= 1e-6, name
            assert delta.abs().max() > 1e-4, name
        else:
            assert torch.equal(merged[name], base[name]), name


LORA_STEPS = """
import json, sys, torch
from checkpoint import read_model_args
from data import load_dataset, rank_micro_batches
from distributed import build_model, init_adapters, load_sharded_weights, setup_distributed
from tokenizer import Tokenizer
from train import make_optimizer, parse_args, train_step
model_path, data_path = sys.argv[1:3]
args = parse_args(["--model_name_or_path", model_path, "--data_path", data_path, "--lora_r", "4"])
_, _, device = setup_distributed()
model = build_model(read_model_args(model_path), args, device)
load_sharded_weights(model, model_path, read_model_args(model_path))
init_adapters(model, args.seed)
before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
optimizer = make_optimizer(model, args)
tokenizer = Tokenizer(model_path + "/tokenizer.model")
dataset = load_dataset(data_path, tokenizer, 256)
model.train()
for step in range(3):
    records = list(range(4 * step, 4 * step + 4))
    batches = rank_micro_batches(dataset, records, 0, 1, 2, True, 256, tokenizer.unk_id)
    train_step(model, optimizer, batches, sum(dataset.n_supervised(i) for i in records), 1e-2, args, device)
print(json.dumps({
    "unchanged": [n for n, p in model.named_parameters() if torch.equal(before[n], p.full_tensor())],
    "dtypes": {n: str(p.dtype) for n, p in model.named_parameters()},
    "optimized": sum(len(group["params"]) for group in optimizer.param_groups),
}))
"""


def test_training_steps_change_the_adapters_only(tiny_model, small_data):
    """Three steps of train.py's own step on a bf16 LoRA model: every base tensor is bit for bit what it was and
    stays bf16, every adapter has moved, and the optimizer holds the adapters alone."""
    result = subprocess.run([sys.executable, "-c", LORA_STEPS, tiny_model, small_data], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": CACHE})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    base = [n for n in report["dtypes"] if ".lora_" not in n]
    assert sorted(report["unchanged"]) == sorted(base)
    assert all(report["dtypes"][n] == "torch.bfloat16" for n in base)
    assert all(report["dtypes"][n] == "torch.float32" for n in report["dtypes"] if ".lora_" in n)
    assert report["optimized"] == len(report["dtypes"]) - len(base) == 2 * 2 * 2


def test_lora_output_loads_in_peft_and_generate_answers_alike(fp32_runs, tiny_model):
    """peft on transformers' base with our adapter gives the logits of transformers on our merged export, and
    generate.py answers the same from the adapter directory as from the merged one."""
    out = fp32_runs["root"] / "one"
    theirs = PeftModel.from_pretrained(reference(tiny_model), str(out)).eval()
    merged = reference(str(out / "merged"))
    with torch.no_grad():
        assert (theirs(tokens()).logits - merged(tokens()).logits).abs().max() <= 1e-5
    answers = []
    for path in (out, out / "merged"):
        cli = subprocess.run(
            [sys.executable, GENERATE, "--model_path", str(path), "--max_new_tokens", "12", "--temperature", "0",
             "--output_format", "jsonl", "Give three tips for staying healthy."],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        answers.append(json.loads(cli.stdout)["answer"])
    assert answers[0] == answers[1] and answers[0]


def test_serve_answers_from_an_adapter_directory_as_from_the_merged_model(fp32_runs):
    out = fp32_runs["root"] / "one"
    answers = []
    for path in (out, out / "merged"):
        server = serve.build_server(serve.parse_args(["--model_path", str(path), "--port", "0"]))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            body = {"prompt": "Give three tips for staying healthy.", "max_tokens": 12, "temperature": 0}
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            answers.append(json.loads(connection.getresponse().read())["choices"][0]["text"])
        finally:
            server.shutdown()
            server.server_close()
    assert answers[0] == answers[1] and answers[0]


def test_lora_bf16_two_processes_train_the_adapters_only(tiny_model, small_data, tmp_path):
    """The default path (bf16, dropout), two processes, every projection adapted: the loss falls, and the frozen
    bf16 base comes out as the base rounded to bf16, bit for bit."""
    out = tmp_path / "out"
    flags = common(tiny_model, small_data, out, max_steps=10, learning_rate=5e-2, save_merged=True)
    flags += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--lora_r", "8"]
    run(flags + ["--lora_target_modules", ",".join(LORA_TARGETS)], nproc=2)
    losses = [m["loss"] for m in metrics(out)]
    # A random base's outputs are near uniform and its adapters move them slowly: about 0.1 in 10 steps.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert config["target_modules"] == list(LORA_TARGETS)
    base, merged = load_file(os.path.join(tiny_model, "model.safetensors")), weights(out / "merged")
    assert base.keys() == merged.keys()
    for name in base:
        if not name.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)):
            assert torch.equal(merged[name], base[name].to(torch.bfloat16).float()), name


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--lora_r", "0"], "--lora_r must be >= 1, got 0"),
        (["--lora_r", "8", "--lora_target_modules", "q_proj,qkv"], "--lora_target_modules: unknown module 'qkv'"),
        (["--lora_r", "8", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
        (["--save_merged", "True"], "--save_merged goes with --lora_r"),
    ],
)
def test_bad_lora_flags_give_one_line(flags, expected, tmp_path):
    result = run(["--output_dir", str(tmp_path), *flags], check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


def test_generate_with_an_adapter_of_another_base_or_no_base_gives_one_line(tiny_model, tmp_path):
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    wide = [(n, torch.cat([p, p]) if n.endswith("lora_B.weight") else p) for n, p in ours.named_parameters()]
    save_adapter(str(tmp_path / "wide"), adapter_config(4, 8, 0.0, ["q_proj"], tiny_model), wide)
    save_adapter(str(tmp_path / "lost"), adapter_config(4, 8, 0.0, ["q_proj"], "no/such/base"), ours.named_parameters())
    expected = {
        "wide": "has shape (128, 4) but the base model expects (64, 4)",
        "lost": "base_model_name_or_path 'no/such/base': no such model directory",
    }
    for name, message in expected.items():
        cli = subprocess.run(
            [sys.executable, GENERATE, "--model_path", str(tmp_path / name), "--temperature", "0", "Hi."],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and message in cli.stderr, cli.stderr

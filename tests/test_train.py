"""train.py end to end on the CPU: torchrun with 2 gloo processes against 1 process, resume, schedule, flags."""

import glob
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CACHE, ROOT, TRAIN, assert_same_weights, common, metrics, run, weights
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from checkpoint import load_model


def test_two_process_bf16_run_exports_a_transformers_model(tiny_model, alpaca_sample, tmp_path):
    out = tmp_path / "out"
    flags = common(
        tiny_model,
        str(alpaca_sample),
        out,
        max_steps=12,
        save_dtype="bfloat16",
        model_max_length=512,
        learning_rate=5e-3,
    )
    flags += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--bf16", "True"]
    run(flags, nproc=2)
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert {"lr", "grad_norm", "supervised_tokens_per_s", "mfu", "peak_memory_gb", "epoch"} <= metrics(out)[0].keys()

    ours = load_model(str(out))
    assert ours.args.vocab_size == 32001 and ours.args.pad_token_id == 32000
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 32001, (2, 48))
    with torch.no_grad():
        assert (ours(tokens) - reference(tokens).logits).abs().max() <= 1e-5

    # generate.py: greedy tokens equal transformers' generate on the exported model, and the CLI answers.
    from engine import generate_ids

    prompt = [1, 13866, 338, 385, 15278, 393, 16612, 263, 3414, 29889]
    ours_ids = generate_ids(ours, [prompt], max_new_tokens=24, eos_id=-1)[0]
    with torch.no_grad():
        hf = reference.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert ours_ids == hf[0, len(prompt) :].tolist()
    cli = subprocess.run(
        [sys.executable, os.path.join(ROOT, "generate.py"), "--model_path", str(out), "--max_new_tokens", "8",
         "--temperature", "0", "Give three tips for staying healthy."],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr


def test_two_processes_match_one_process_fp32(tiny_model, small_data, tmp_path):
    batch = {"per_device_train_batch_size": 2, "max_steps": 5, "bf16": False}
    one = common(tiny_model, small_data, tmp_path / "one", gradient_accumulation_steps=4, **batch)
    two = common(tiny_model, small_data, tmp_path / "two", gradient_accumulation_steps=2, **batch)
    run(one + ["--packing", "False"])
    run(two + ["--packing", "False"], nproc=2)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), 1e-5, order_changed=True)


def test_shard_grad_op_matches_full_shard_fp32(tiny_model, small_data, tmp_path):
    """ZeRO-2, its weights kept gathered over the micro-batches of a step, computes the same step as FSDP."""
    flags = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, bf16=False)
    run(common(tiny_model, small_data, tmp_path / "full", **flags), nproc=2)
    run(common(tiny_model, small_data, tmp_path / "zero2", fsdp="shard_grad_op auto_wrap", **flags), nproc=2)
    for a, b in zip(metrics(tmp_path / "full"), metrics(tmp_path / "zero2"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "zero2"), 1e-5, order_changed=True)


def test_two_machines_hybrid_shard_match_one_machine_fp32(tiny_model, small_data, tmp_path):
    """Two torchrun launchers (--nnodes 2, 2 processes each, a c10d rendezvous on 127.0.0.1) with hybrid_shard
    export the weights of one launcher of 4 processes with full_shard."""
    flags = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, bf16=False)
    run(common(tiny_model, small_data, tmp_path / "one", **flags), nproc=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=hsdp-test", TRAIN]  # fmt: skip
    launch += common(tiny_model, small_data, tmp_path / "two", fsdp="hybrid_shard auto_wrap", **flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": CACHE}
    machines = [subprocess.Popen(launch, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [machine.communicate(timeout=300)[1] for machine in machines]
    assert all(machine.returncode == 0 for machine in machines), errors
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), 1e-5, order_changed=True)


def test_packing_matches_padding_fp32(tiny_model, small_data, tmp_path):
    """Packing rearranges the same records of a step into rows: the same losses and weights."""
    flags = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=4, bf16=False)
    run(common(tiny_model, small_data, tmp_path / "padded", packing=False, **flags))
    run(common(tiny_model, small_data, tmp_path / "packed", packing=True, **flags))
    for a, b in zip(metrics(tmp_path / "padded"), metrics(tmp_path / "packed"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert_same_weights(weights(tmp_path / "padded"), weights(tmp_path / "packed"), 1e-5, order_changed=True)


def test_accumulation_matches_larger_micro_batch(tiny_model, small_data, tmp_path):
    flags = dict(max_steps=4, bf16=False, packing=False)
    run(common(tiny_model, small_data, tmp_path / "accum", per_device_train_batch_size=1, **flags)
        + ["--gradient_accumulation_steps", "4"])  # fmt: skip
    run(common(tiny_model, small_data, tmp_path / "micro", per_device_train_batch_size=4, **flags)
        + ["--gradient_accumulation_steps", "1"])  # fmt: skip
    for a, b in zip(metrics(tmp_path / "accum"), metrics(tmp_path / "micro"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert_same_weights(weights(tmp_path / "accum"), weights(tmp_path / "micro"), 1e-5, order_changed=True)


def test_resume_mid_epoch_matches_uninterrupted(tiny_model, small_data, tmp_path):
    flags = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, bf16=False)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(common(tiny_model, small_data, full, save_strategy="steps", save_steps=3, **flags), nproc=2)
    assert sorted(os.listdir(full / "checkpoint-3")) and os.path.isdir(full / "checkpoint-6")
    # What a run killed after step 3 leaves behind: its complete checkpoint-3.
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    run(common(tiny_model, small_data, resumed, resume_from_checkpoint="latest", **flags), nproc=2)
    steps = metrics(resumed)
    assert [m["step"] for m in steps] == [4, 5, 6]  # 64 records / global batch 8: steps 4-6 are mid-epoch
    for a, b in zip(metrics(full)[3:], steps, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert_same_weights(weights(full), weights(resumed), 1e-6)


def test_learning_rate_follows_warmup_then_cosine(tiny_model, small_data, tmp_path):
    total, peak = 10, 1e-3
    run(common(tiny_model, small_data, tmp_path, max_steps=total, warmup_ratio=0.15, bf16=False,
               per_device_train_batch_size=1, gradient_accumulation_steps=1))  # fmt: skip
    # The independent reference: transformers' scheduler, which the original run used.
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.15 * total), total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    got = [m["lr"] for m in metrics(tmp_path)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] == 0.0 and max(got) == pytest.approx(peak)


def test_original_launch_line_runs(tiny_model, small_data, tmp_path):
    out = tmp_path / "out"
    line = f"""--model_name_or_path {tiny_model} --data_path {small_data}
        --bf16 True --output_dir {out} --num_train_epochs 1
        --per_device_train_batch_size 4 --per_device_eval_batch_size 4
        --gradient_accumulation_steps 8 --evaluation_strategy no
        --save_strategy steps --save_steps 2000 --save_total_limit 1
        --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03
        --lr_scheduler_type cosine --logging_steps 1
        --fsdp full_shard_auto_wrap --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer
        --tf32 True"""
    args = line.split()
    args[args.index("full_shard_auto_wrap")] = "full_shard auto_wrap"
    run(args, nproc=2)
    assert len(metrics(out)) == 1  # 64 records, global batch 4 x 8 x 2 = 64: one step per epoch
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer.model")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--deepspeed", "./configs/default_offload_opt_param.json"], "--cpu_offload"),
        (["--learning_rate", "-1"], "--learning_rate must be positive"),
        (["--bf16", "maybe"], "expected True or False"),
        (["--lr_scheduler_type", "linear"], "invalid choice"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
        (["--fsdp", "hybrid_shard"], "--fsdp 'hybrid_shard'"),
        (["--dry_run", "--dry_run_nodes", "2"], "--dry_run_nodes 2: needs --dry_run_gpus"),
        (["--dry_run", "--dry_run_gpus", "3", "--dry_run_nodes", "2"], "--dry_run_nodes 2: needs --dry_run_gpus"),
        (["--evaluation_strategy", "steps"], "invalid choice: 'steps' (choose from 'no')"),
        (["--no_such_flag", "1"], "unrecognized arguments"),
    ],
)
def test_bad_flags_give_one_line(flags, expected, tmp_path):
    result = run(["--output_dir", str(tmp_path), *flags], check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, --cpu_offload trains")
@pytest.mark.parametrize("flags", [["--cpu_offload", "True"], ["--fsdp", "full_shard auto_wrap offload"]])
def test_cpu_offload_without_a_gpu_is_one_line(flags, tmp_path):
    result = run(["--output_dir", str(tmp_path), *flags], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "this machine has none" in result.stderr, result.stderr


def test_dry_run_plans_cpu_offload(tmp_path, tokenizer_model, alpaca_sample):
    """With --cpu_offload the sharded weights, gradients and AdamW state leave the GPU's total for CPU memory, and
    the plan says what crosses between the two each step."""
    flags = common("7B", str(alpaca_sample), tmp_path, model_max_length=512, tokenizer_path=str(tokenizer_model))
    flags += ["--dry_run", "--dry_run_gpu", "H100", "--dry_run_gpus", "8", "--gradient_accumulation_steps", "4"]
    plain, offload = run(flags).stdout, run([*flags, "--cpu_offload", "True"]).stdout
    state = float(re.search(r"weights, grads, AdamW ([\d.]+) GB", plain).group(1))
    total = float(re.search(r"= ([\d.]+) GB", plain).group(1))
    assert float(re.search(r"= ([\d.]+) GB", offload).group(1)) == pytest.approx(total - state, abs=0.02)
    assert f"--cpu_offload    {state:.2f} GB of CPU memory per rank" in offload
    # Each rank's fp32 shard of 6.74 B parameters goes up twice per micro-batch (4) and its gradients down once.
    copies = float(re.search(r"([\d.]+) GB copied between CPU and GPU", offload).group(1))
    assert copies == pytest.approx(9 * 4 * 6.738e9 / 8 / 1e9, rel=0.01)


def test_dry_run_memory_against_the_measured_peak(tmp_path, tokenizer_model, alpaca_sample):
    """The dry run's per-rank memory for a CPU run against the peak resident memory that run reaches. The plan adds
    up the bytes the parts of a step hold; resident memory on the CPU is more, and grows over the first steps:
    glibc keeps every freed block (distributed.tune_cpu_allocations) and the heap fragments. So the plan is about a
    lower bound: two steps here reach 1.00-1.06x of it, longer runs more (the range in BENCHMARKS.md)."""
    from checkpoint import save_hf_checkpoint
    from model import ModelArgs, Transformer

    args = ModelArgs(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, vocab_size=32000)
    torch.manual_seed(0)
    save_hf_checkpoint(str(tmp_path / "model"), args, Transformer(args).named_parameters(), str(tokenizer_model))
    flags = common(str(tmp_path / "model"), str(alpaca_sample), tmp_path / "out", model_max_length=512, max_steps=2)
    flags += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    plan = run([*flags, "--dry_run", "--dry_run_gpu", "cpu", "--dry_run_gpus", "2"]).stdout
    planned = float(re.search(r"= ([\d.]+) GB", plan).group(1))
    run(flags, nproc=2)
    measured = max(m["peak_memory_gb"] for m in metrics(tmp_path / "out"))
    assert 0.95 * planned <= measured <= 4 / 3 * planned, (planned, measured, plan)


def test_report_to_tensorboard_has_metrics_jsonl_step_by_step(tiny_model, small_data, tmp_path):
    """Rank 0 alone writes TensorBoard events under output_dir/runs/: every field of metrics.jsonl, at every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    flags = common(tiny_model, small_data, out, max_steps=4, per_device_train_batch_size=2)
    run([*flags, "--gradient_accumulation_steps", "2", "--report_to", "tensorboard"], nproc=2)
    files = [os.path.join(folder, f) for folder, _, names in os.walk(out / "runs") for f in names]
    assert len(files) == 1 and ".tfevents." in files[0], files
    events = EventAccumulator(files[0])
    events.Reload()
    logged = metrics(out)
    assert len(logged) == 4
    fields = {f"train/{'learning_rate' if key == 'lr' else key}": key for key in logged[0] if key != "step"}
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= fields.keys()
    assert sorted(events.Tags()["scalars"]) == sorted(fields)
    for tag, key in fields.items():  # TensorBoard keeps float32
        expected = [(m["step"], float(np.float32(m[key]))) for m in logged]
        assert [(e.step, e.value) for e in events.Scalars(tag)] == expected, tag


def wandb_history(path: str) -> list[dict]:
    """The logged steps of a .wandb file: protobuf records (wandb.proto's Record) in LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: CRC, length, type), after a 7-byte file header. wandb 0.31 ships no
    reader for it."""
    from wandb.proto.wandb_internal_pb2 import Record

    with open(path, "rb") as f:
        data = f.read()
    steps, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if (room := 32768 - position % 32768) < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                steps.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return steps


def test_report_to_wandb_offline(tiny_model, small_data, tmp_path, monkeypatch):
    """WANDB_MODE=offline: a run under output_dir/wandb/ that logged every field of metrics.jsonl at every step."""
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    run([*common(tiny_model, small_data, out, max_steps=3, per_device_train_batch_size=2), "--report_to", "wandb"])
    [run_file] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, logged = wandb_history(run_file), metrics(out)
    assert len(history) == len(logged) == 3
    for step, m in zip(history, logged, strict=True):
        assert step["_step"] == m["step"]
        assert {k: v for k, v in step.items() if k.startswith("train/")} == {
            f"train/{'learning_rate' if key == 'lr' else key}": value for key, value in m.items() if key != "step"
        }


def test_report_to_a_missing_package_is_one_line(tmp_path, monkeypatch):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n\n\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('tensorboard', 'wandb'):\n"
        "            raise ModuleNotFoundError(name)\n\n\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hide))
    for package in ("tensorboard", "wandb"):
        result = run(["--output_dir", str(tmp_path / "out"), "--report_to", package], check=False)
        expected = f"error: --report_to {package}: the {package} package is not installed (pip install {package})\n"
        assert result.returncode == 1 and result.stderr == expected, result.stderr
    assert not os.path.exists(tmp_path / "out")

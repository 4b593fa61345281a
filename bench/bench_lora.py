"""Full fine-tuning against LoRA (r 8 on q_proj and v_proj, alpaca-lora's setting) on the same model and data:
peak memory per rank and time per optimizer step, side by side, with what the dry run planned for each.

    python bench/bench_lora.py [--dim 1024 --layers 8 --nproc 2 --steps 4 --gradient_checkpointing False]

A random LLaMA of the given shape (vocab 32000) is written once. Both sides are train.py itself under torchrun
(gloo on the CPU): bf16, the first records of alpaca_sample.json packed into 512-token rows, micro-batch 4 x 2
accumulation per rank, one side after the other. Each reports what train.py logs on rank 0: peak memory (peak
RSS on the CPU, max_memory_allocated on CUDA) and seconds per step (the median after the first step).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

from checkpoint import save_hf_checkpoint  # noqa: E402
from model import ModelArgs, Transformer, count_parameters  # noqa: E402

LORA = ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--lora_target_modules", "q_proj,v_proj"]


def write_model(path: str, dim: int, layers: int) -> ModelArgs:
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=dim // 64, hidden_dim=int(dim * 8 / 3) // 64 * 64)
    args.vocab_size = 32000
    torch.manual_seed(0)
    tokenizer = os.path.join(SHARED, "llama_tokenizer.model")
    save_hf_checkpoint(path, args, Transformer(args).named_parameters(), tokenizer)
    return args


def train(flags: list[str], nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    return subprocess.run(cmd + [os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True, env=env)


def measure(flags: list[str], out: str, nproc: int) -> dict:
    planned = train([*flags, "--output_dir", out, "--dry_run", "--dry_run_gpu", "cpu", "--dry_run_gpus", str(nproc)], 1)
    ran = train([*flags, "--output_dir", out], nproc)
    if ran.returncode or planned.returncode:
        sys.exit(f"train.py failed:\n{(ran.stderr or planned.stderr)[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    return {
        "peak_gb": max(s["peak_memory_gb"] for s in steps),
        "planned_gb": float(re.search(r"= ([\d.]+) GB", planned.stdout).group(1)),
        "step_s": statistics.median(s["seconds"] for s in steps[1:]),
        "loss": steps[-1]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--gradient_checkpointing", default="False", help="True or False, for both sides")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args = write_model(os.path.join(tmp, "model"), a.dim, a.layers)
        with open(os.path.join(SHARED, "alpaca_sample.json")) as f:
            records = json.load(f)[: 8 * a.nproc * a.steps]  # one epoch of the steps measured
        data = os.path.join(tmp, "data.json")
        with open(data, "w") as f:
            json.dump(records, f)
        flags = ["--model_name_or_path", os.path.join(tmp, "model"), "--data_path", data, "--max_steps", str(a.steps)]
        flags += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--save_strategy", "no"]
        flags += ["--gradient_checkpointing", a.gradient_checkpointing]
        results = {
            "full": measure(flags, os.path.join(tmp, "full"), a.nproc),
            "LoRA r8 q,v": measure(flags + LORA, os.path.join(tmp, "lora"), a.nproc),
        }
    print(f"model dim {a.dim}, {a.layers} layers, vocab 32000, {count_parameters(args) / 1e6:.0f} M parameters; "
          f"{a.nproc} ranks, micro-batch 4 x 2 accumulation, 512-token packed rows, bf16, {a.steps} steps, "
          f"gradient checkpointing {a.gradient_checkpointing}")  # fmt: skip
    print(f"{'':12s} {'peak memory per rank':>20s} {'dry run planned':>16s} {'s per step':>11s} {'last loss':>10s}")
    for side, r in results.items():
        print(f"{side:12s} {r['peak_gb']:17.2f} GB {r['planned_gb']:13.2f} GB {r['step_s']:11.1f} {r['loss']:10.4f}")
    full, lora = results["full"], results["LoRA r8 q,v"]
    print(f"LoRA / full: {lora['peak_gb'] / full['peak_gb']:.2f}x peak memory, {lora['step_s'] / full['step_s']:.2f}x "
          "time per step")  # fmt: skip


if __name__ == "__main__":
    main()

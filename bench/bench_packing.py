"""A whole epoch of alpaca_sample.json through train.py: packed rows against the original padded batches.

    python bench/bench_packing.py [--dim 512 --layers 4 --nproc 2]

Both runs train the same random small LLaMA (real 32000-piece tokenizer, bf16) on the same records per step
(micro-batch 4, accumulation 4, the same seed), under torchrun with `--nproc` gloo processes. Prints the
supervised tokens/s of each over the epoch (wall time of the training loop, from metrics.jsonl), their ratio,
and both loss curves at a few points, which should have the same shape (the same records per step).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
from checkpoint import save_hf_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def run(model: str, out: str, packing: bool, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [os.path.join(ROOT, "train.py"), "--model_name_or_path", model, "--output_dir", out]
    cmd += ["--data_path", os.path.join(SHARED, "alpaca_sample.json"), "--num_train_epochs", "1"]
    cmd += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4", "--learning_rate", "1e-3"]
    cmd += ["--logging_steps", "1", "--save_strategy", "no", "--packing", str(packing), "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args()
    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 32, hidden_dim=a.dim * 8 // 3, vocab_size=32000)
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        model = os.path.join(work, "model")
        tokenizer = os.path.join(SHARED, "llama_tokenizer.model")
        save_hf_checkpoint(model, args, Transformer(args).named_parameters(), tokenizer, torch.float32)
        curves = {
            name: run(model, os.path.join(work, name), name == "packed", a.nproc) for name in ["padded", "packed"]
        }
    # Training-loop time only (metrics.jsonl logs every step): loading, tokenizing and export left out.
    rates = {
        name: sum(r["supervised_tokens"] for r in rs) / sum(r["seconds"] for r in rs) for name, rs in curves.items()
    }
    steps = len(curves["packed"])
    print(f"model dim {a.dim}, {a.layers} layers, {a.nproc} processes; one epoch = {steps} steps")
    for name, records in curves.items():
        losses = [records[i]["loss"] for i in (0, steps // 4, steps // 2, 3 * steps // 4, steps - 1)]
        print(f"{name:7s} loss at 0, 1/4, 1/2, 3/4, end: " + " ".join(f"{x:.3f}" for x in losses))
    for name, rate in rates.items():
        print(f"{name:7s} {rate:.0f} supervised tokens/s over the epoch")
    print(f"packed / padded supervised tokens/s: {rates['packed'] / rates['padded']:.2f}x")


if __name__ == "__main__":
    main()

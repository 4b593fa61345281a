"""Training throughput and MFU of train.py on one GPU, for a LLaMA-7B-shaped model cut to fewer layers.

    python bench/gpu_train.py --data_path alpaca_sample.json --tokenizer llama_tokenizer.model [--layers 10]

Writes a random bf16 checkpoint with 7B's shapes (dim 4096, 32 heads, SwiGLU 11008, vocab 32000) and
`--layers` decoder layers, then runs train.py under torchrun (NCCL, FSDP, bf16) on real Alpaca records:
packed, packed with --compile, and padded (the original batching). Prints supervised tokens/s, MFU against the
GPU's dense bf16 peak (the FLOP count is model.training_flops: 6 x decoder matmul weights + causal attention per
real token, 6 x output weights per supervised token) and peak memory, each the mean over the steps after warm-up,
and the ratio of packed to padded.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import save_hf_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def write_checkpoint(path: str, args: ModelArgs, tokenizer: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Transformer(args).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    save_hf_checkpoint(path, args, model.named_parameters(), tokenizer, torch.bfloat16)


def train(model: str, data: str, out: str, steps: int, extra: list[str]) -> list[dict]:
    nproc = max(1, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [os.path.join(ROOT, "train.py"), "--model_name_or_path", model, "--data_path", data]
    cmd += ["--output_dir", out, "--max_steps", str(steps), "--save_strategy", "no", "--logging_steps", "1"]
    cmd += ["--bf16", "True", "--tf32", "True", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(name: str, records: list[dict], warmup: int) -> dict:
    steady = records[warmup:]
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    row = {
        "run": name,
        "sup_tok_s": mean("supervised_tokens_per_s"),
        "tok_s": mean("tokens_per_s"),
        "mfu": mean("mfu") if steady[0]["mfu"] is not None else float("nan"),
        "peak_gb": max(r["peak_memory_gb"] for r in steady),
        "final_loss": records[-1]["loss"],
    }
    print(
        f"{name:16s} {row['sup_tok_s']:10.0f} sup tok/s {row['tok_s']:10.0f} tok/s  MFU {row['mfu']:6.1%}  "
        f"peak {row['peak_gb']:.1f} GB  loss {row['final_loss']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data_path", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden_dim", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the means")
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=8)
    p.add_argument("--runs", default="packed,compiled,padded")
    a = p.parse_args()
    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, hidden_dim=a.hidden_dim, vocab_size=32000)
    work = tempfile.mkdtemp()
    try:
        model = os.path.join(work, "model")
        write_checkpoint(model, args, a.tokenizer)
        common = ["--per_device_train_batch_size", str(a.micro_batch)]
        common += ["--gradient_accumulation_steps", str(a.accumulation), "--learning_rate", "1e-5"]
        variants = {
            "packed": ["--packing", "True"],
            "compiled": ["--packing", "True", "--compile", "True"],
            "padded": ["--packing", "False"],
        }
        rows = {}
        for name in a.runs.split(","):
            records = train(model, a.data_path, os.path.join(work, name), a.steps, common + variants[name])
            rows[name] = summary(name, records, a.warmup)
        if "packed" in rows and "padded" in rows:
            ratio = rows["packed"]["sup_tok_s"] / rows["padded"]["sup_tok_s"]
            print(f"packed / padded supervised tokens/s: {ratio:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

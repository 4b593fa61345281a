"""Peak resident memory of weight_diff.py's make_diff and recover, against the size of the fp32 model, beside
stanford_alpaca's way (both models loaded whole with transformers, as restated in tests/test_weight_diff.py).

    python bench/bench_weight_diff.py [--dim 1024 --layers 8 --shard_mb 100]

A random LLaMA of the given shape (vocab 32000) is written by checkpoint.py as the raw model (bf16, as LLaMA's
Hugging Face conversion) and, moved at random and with its [PAD] row, as the tuned one (fp32). Each side runs in a
fresh process that reports its own peak RSS (VmHWM; ru_maxrss would carry over the launching process's peak
across exec) and, as the baseline, that of the same process with everything imported and nothing run. Ours runs
twice: with the 5 GB shards that 7B's 27 GB are written in (one shard here), and with --shard_mb shards, for how
memory goes when the model is many shards long.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

from checkpoint import add_pad_rows, save_hf_checkpoint  # noqa: E402
from model import ModelArgs, Transformer, count_parameters  # noqa: E402

CHILD = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import plan, weight_diff
from test_weight_diff import original_make_diff, original_recover
{call}
print(plan.peak_rss_bytes())
"""


def peak_rss(call: str) -> int:
    code = CHILD.format(root=ROOT, tests=os.path.join(ROOT, "tests"), call=call)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{call} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


def write_models(tmp: str, dim: int, layers: int) -> tuple[str, str, ModelArgs]:
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=dim // 64, hidden_dim=256 * -(-int(dim * 8 / 3) // 256))
    args.vocab_size = 32000
    torch.manual_seed(0)
    model = Transformer(args)
    tokenizer = os.path.join(SHARED, "llama_tokenizer.model")
    raw, tuned = os.path.join(tmp, "raw"), os.path.join(tmp, "tuned")
    save_hf_checkpoint(raw, args, model.named_parameters(), tokenizer, torch.bfloat16)
    tuned_args = ModelArgs(**{**vars(args), "vocab_size": 32001, "pad_token_id": 32000})

    def moved() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in model.named_parameters():
            param = param.detach().bfloat16().float()  # what raw holds
            if name in ("embed_tokens.weight", "lm_head.weight"):
                param = add_pad_rows(param, 32001)
            yield name, param + 0.001 * torch.randn_like(param)

    save_hf_checkpoint(tuned, tuned_args, moved(), tokenizer, torch.float32)
    return raw, tuned, tuned_args


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shard_mb", type=int, default=100, help="the smaller shard size ours also runs with")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw, tuned, args = write_models(tmp, a.dim, a.layers)
        size = 4 * count_parameters(args)
        paths = {name: os.path.join(tmp, name) for name in ("diff", "out", "diff_s", "out_s", "odiff", "oout")}
        small = a.shard_mb * 1_000_000
        runs = {
            "nothing (imports only)": "",
            "ours make_diff, 5 GB shards": f"weight_diff.make_diff({raw!r}, {tuned!r}, {paths['diff']!r})",
            "ours recover, 5 GB shards": f"weight_diff.recover({raw!r}, {paths['diff']!r}, {paths['out']!r})",
            f"ours make_diff, {a.shard_mb} MB shards": (
                f"weight_diff.make_diff({raw!r}, {tuned!r}, {paths['diff_s']!r}, max_shard_bytes={small})"
            ),
            f"ours recover, {a.shard_mb} MB shards": (
                f"weight_diff.recover({raw!r}, {paths['diff_s']!r}, {paths['out_s']!r}, max_shard_bytes={small})"
            ),
            "stanford_alpaca make_diff": f"original_make_diff({raw!r}, {tuned!r}, {paths['odiff']!r})",
            "stanford_alpaca recover": f"original_recover({raw!r}, {paths['odiff']!r}, check_integrity_naively=False)",
        }
        peaks = {name: peak_rss(call) for name, call in runs.items()}
    base = peaks.pop("nothing (imports only)")
    print(f"model dim {a.dim}, {a.layers} layers, vocab 32001: {count_parameters(args) / 1e6:.0f} M parameters, "
          f"{size / 1e9:.3f} GB in fp32; raw in bf16. Baseline (python, torch, transformers imported): "
          f"{base / 1e9:.2f} GB")  # fmt: skip
    print(f"{'':36s} {'peak RSS':>9s} {'/ model':>8s} {'above baseline':>15s} {'/ model':>8s}")
    for name, peak in peaks.items():
        print(f"{name:36s} {peak / 1e9:6.2f} GB {peak / size:7.2f}x {(peak - base) / 1e9:12.2f} GB "
              f"{(peak - base) / size:7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

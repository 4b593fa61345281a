"""Peak resident memory of checkpoint.load_model on a ~1 GB safetensors checkpoint, as a ratio to its size.

    python bench/load_memory.py [--gb 1.0]

Writes a random fp32 checkpoint to a temp dir, then loads it in a fresh process under /usr/bin/time -v.
Prints the peak RSS, the RSS of the same process with torch and model.py imported (and torch's meta kernels
loaded) but no weights, and both as ratios to the checkpoint's size.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import save_hf_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

LOAD = """
import sys; sys.path.insert(0, {root!r})
import torch, model, checkpoint
with torch.device("meta"):
    model.Transformer(model.ModelArgs(dim=64, n_layers=1, n_heads=4, hidden_dim=128, vocab_size=100))
if {load}:
    checkpoint.load_model({path!r})
"""


def peak_rss_bytes(code: str) -> int:
    out = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size to write, in GB")
    gb = parser.parse_args().gb
    layer_bytes = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816)  # dim 1024, fp32
    args = ModelArgs(dim=1024, n_layers=max(1, round(gb * 1e9 / layer_bytes)), n_heads=16, hidden_dim=2816)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as path:
        save_hf_checkpoint(path, args, Transformer(args).named_parameters(), None, torch.float32)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        loaded = peak_rss_bytes(LOAD.format(root=root, path=path, load=True))
        baseline = peak_rss_bytes(LOAD.format(root=root, path=path, load=False))
    print(f"checkpoint {size / 1e9:.2f} GB ({args.n_layers} layers, dim {args.dim}, fp32 safetensors)")
    print(f"peak RSS loading  {loaded / 1e9:.2f} GB = {loaded / size:.2f}x the checkpoint")
    print(f"peak RSS, no load {baseline / 1e9:.2f} GB (python + torch + model.py)")
    print(f"loading adds      {(loaded - baseline) / 1e9:.2f} GB = {(loaded - baseline) / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()

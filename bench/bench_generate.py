"""Decoding speed of generate.py against transformers' generate: the same random LLaMA, the same prompt, greedy,
batch 1, in one process. Each side is warmed up, then timed several times in alternation (so that a noisy
neighbour slows all alike); tokens/s counts the whole call, prefill included. generate.py runs as its command
line does on the CPU (weights oneDNN-packed, q/k/v and gate/up fused: `use_cpu_decoding_layout`), with
`--compile` (`optimize.CompiledSteps`; its first call, which compiles, is timed apart and left out) and, to show what
the CPU layout is worth, as loaded.

    python bench/bench_generate.py --dim 512 --threads 1 --runs 7
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from random_llama import llama_config
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import load_model  # noqa: E402
from data import format_prompt  # noqa: E402
from engine import generate_ids  # noqa: E402
from optimize import CompiledSteps, use_cpu_decoding_layout  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "data" / "llama_tokenizer.model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    config = llama_config(args.dim, args.n_layers, max_positions=2048)
    hf_model = LlamaForCausalLM(config).to(dtype).eval()
    model_dir = tempfile.mkdtemp()
    try:
        hf_model.save_pretrained(model_dir)
        shutil.copyfile(TOKENIZER, os.path.join(model_dir, "tokenizer.model"))
        model = load_model(model_dir, dtype=dtype)
        compiled = load_model(model_dir, dtype=dtype)
        as_loaded = load_model(model_dir, dtype=dtype)
    finally:
        shutil.rmtree(model_dir)
    use_cpu_decoding_layout(model)  # as generate.py's command line does on the CPU
    compiled_steps = CompiledSteps(compiled)  # as --compile does
    tokenizer = Tokenizer(str(TOKENIZER))
    prompt = tokenizer.encode(format_prompt("Give three tips for staying healthy."), bos=True)
    n = args.new_tokens

    def ours() -> list[int]:
        return generate_ids(model, [prompt], n, tokenizer.eos_id)[0]

    def ours_compiled() -> list[int]:
        return generate_ids(compiled, [prompt], n, tokenizer.eos_id, compiled=compiled_steps)[0]

    def ours_as_loaded() -> list[int]:
        return generate_ids(as_loaded, [prompt], n, tokenizer.eos_id)[0]

    def transformers() -> list[int]:
        input_ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf_model.generate(input_ids, do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.eos_id)
        return out[0, len(prompt) :].tolist()

    sides = {
        "generate.py": ours,
        "generate.py --compile": ours_compiled,
        "as loaded": ours_as_loaded,
        "transformers": transformers,
    }
    start = time.perf_counter()
    ours_compiled()
    compile_seconds = time.perf_counter() - start
    answers = {name: fn() for name, fn in sides.items()}
    for name, answer in answers.items():  # a random model that said EOS early would time a shorter answer
        assert len(answer) == n, f"{name} stopped after {len(answer)} tokens (EOS): change the seed"
    same = {name: answer == answers["transformers"] for name, answer in answers.items()}
    for _ in range(args.warmup - 1):
        for fn in sides.values():
            fn()
    wall = {name: [] for name in sides}
    cpu = {name: [] for name in sides}  # CPU time of this process: what neighbours' load distorts least
    for _ in range(args.runs):
        for name, fn in sides.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)

    params = sum(p.numel() for p in as_loaded.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim {args.dim}, {args.n_layers} layers, "
        f"{params:.0f}M parameters, {args.dtype}; prompt {len(prompt)} tokens + {n} new, batch 1, greedy"
    )
    print(
        "same tokens as transformers: " + ", ".join(f"{name} {same[name]}" for name in sides if name != "transformers")
    )
    print(f"first call of generate.py --compile (compiling): {compile_seconds:.1f} s")
    print(f"{'':38}{'tokens/s, wall clock':>22}{'tokens per CPU second':>24}")
    print(f"{'':38}{'best':>12}{'median':>10}{'best':>14}{'median':>10}")
    widths, speed = (12, 10, 14, 10), {}
    for name in sides:
        speed[name] = [n / min(wall[name]), n / statistics.median(wall[name])]
        speed[name] += [n / min(cpu[name]), n / statistics.median(cpu[name])]
        print(f"{name:38}" + "".join(f"{x:{w}.1f}" for x, w in zip(speed[name], widths, strict=True)))
    for name in ("generate.py", "generate.py --compile", "as loaded"):
        ratios = [a / b for a, b in zip(speed[name], speed["transformers"], strict=True)]
        label = f"{name} / transformers"
        print(f"{label:38}" + "".join(f"{x:{w - 1}.2f}x" for x, w in zip(ratios, widths, strict=True)))


if __name__ == "__main__":
    main()

"""Decoding speed against transformers, llama.cpp and the memory bandwidth, in one run, on one random LLaMA (8
layers x 768 by default, saved by transformers in bf16), greedy: every ratio the decoding goals name.

1. Whole process, batch 1, from a cold start to the answer's last token (what a user waits for the first
   request): `generate.py --dtype bfloat16` uncompiled, and with `--compile` once its library is on disk (a later
   run); transformers' `generate` in a process of its own; llama.cpp (llama-cpp-python) on the same weights,
   converted to a bf16 GGUF by llama.cpp's own convert_hf_to_gguf.py (--convert_script), with EOS banned so that
   it writes as many tokens.
2. In-process decoding speed (the steps after the prompt, as the engine times them) of bf16 in the CPU layout
   and of --quantize int8, uncompiled and with --compile, and llama.cpp's own count of its decoding steps,
   against the limit the memory sets: the weight bytes a token reads / the stream bandwidth of a sum over 1 GiB.
3. --compile's first start: the step compiled into an empty cache directory, and a later run's load.
4. Batched: 8 and 16 Alpaca prompts of different lengths, bf16: the engine against transformers' left-padded
   `generate`.
5. With --trained_model: how often int8's greedy choice is bf16's, over 20 held-out prompts.

Every side runs --runs times, the sides in turn, and the best run counts (the machine may be shared). The ratios
come last, with the CPU's name (lscpu) and the bandwidth measured before and after.

    pip install llama-cpp-python gguf   # llama-cpp-python builds llama.cpp: minutes
    python bench/bench_decode.py --runs 3 --compile --convert_script llama.cpp/convert_hf_to_gguf.py
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from random_llama import llama_config
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import load_model  # noqa: E402
from data import format_prompt, read_records  # noqa: E402
from engine import Engine, Request, generate_ids  # noqa: E402
from optimize import CompiledSteps, Int8Linear, quantize_int8, use_cpu_decoding_layout  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PROMPT = "Give three tips for staying healthy."

LLAMA_CPP_PROCESS = """
import sys, time, llama_cpp
gguf, threads, n, *ids = sys.argv[1:]
llm = llama_cpp.Llama(gguf, n_ctx=2048, n_threads=int(threads), n_batch=512, verbose=False)
out = llm.create_completion([int(i) for i in ids], max_tokens=int(n), temperature=0, top_k=1,
                            logit_bias={llm.token_eos(): -1e9})
perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
print(out["usage"]["completion_tokens"], perf.n_eval / perf.t_eval_ms * 1000)
"""


def transformers_process(model_dir: str, ids: list[int], new_tokens: int) -> None:
    """The reference side of the whole-process race: what a transformers user runs."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    print(out.shape[1] - len(ids))


def best_of(runs: int, sides: dict) -> dict[str, float]:
    """The shortest time of each side over `runs` turns, the sides alternating."""
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(runs):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def decode_speed(model, prompt_ids: list[list[int]], new_tokens: int, compiled=None) -> float:
    """Tokens/s of the decoding steps alone, all rows counted, as the engine times them."""
    engine = Engine(model, -1, len(prompt_ids), max_len=512, compiled=compiled)
    engine.submit([Request(ids, new_tokens) for ids in prompt_ids])
    engine.run_until_done()
    return engine.stats["tokens"] / engine.stats["decode_seconds"]


def stream_bandwidth(runs: int) -> float:
    big = torch.ones(2**28)  # 1 GiB of fp32, far beyond any cache
    best = min(best_of(runs, {"sum": big.sum}).values())
    return big.numel() * big.element_size() / best


def weight_bytes(model) -> int:
    """Bytes each decoding step reads from weights: every linear layer's (and int8's scales). The embedding gives
    one row, the norms are vectors."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    int8 = [t for m in model.modules() if isinstance(m, Int8Linear) for t in (m.int8_weight, m.scales)]
    return sum(t.numel() * t.element_size() for t in linears + int8)


def cpu_name() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")


def agreement(model_dir: str, n_prompts: int, new_tokens: int) -> tuple[float, int, int]:
    """(share of positions where int8's greedy choice, given bf16's answer so far, is bf16's; answers equal
    in free-running greedy decoding; prompts), over the first held-out records of the sample beside the model."""
    tokenizer = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    bf16 = load_model(model_dir, dtype=torch.bfloat16)
    int8 = load_model(model_dir, dtype=torch.bfloat16)
    quantize_int8(int8)
    records = read_records(str(Path(model_dir).parent / "sample" / "heldout.json"))[:n_prompts]
    prompts = [tokenizer.encode(format_prompt(instruction, input), bos=True) for instruction, input, _ in records]
    same_positions = positions = same_answers = 0
    for ids in prompts:
        answer = generate_ids(bf16, [ids], new_tokens, tokenizer.eos_id)[0] + [tokenizer.eos_id]
        with torch.inference_mode():
            choices = int8(torch.tensor([ids + answer[:-1]]))[0, len(ids) - 1 :].argmax(-1).tolist()
        same_positions += sum(a == b for a, b in zip(answer, choices, strict=True))
        positions += len(answer)
        same_answers += generate_ids(int8, [ids], new_tokens, tokenizer.eos_id)[0] == answer[:-1]
    return same_positions / positions, same_answers, len(prompts)


def llama_cpp_available(convert_script: str | None) -> str | None:
    """Why llama.cpp cannot run here, or None."""
    if convert_script is None:
        return "no --convert_script (llama.cpp's convert_hf_to_gguf.py)"
    found = subprocess.run([sys.executable, "-c", "import llama_cpp, gguf"], capture_output=True, text=True)
    return None if found.returncode == 0 else "llama_cpp or gguf is not importable (pip install llama-cpp-python gguf)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=384, help="batch 1 (default: 384)")
    parser.add_argument("--batched_new_tokens", type=int, default=128)
    parser.add_argument("--batch_sizes", default="8,16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also bf16 and int8 with --compile")
    parser.add_argument("--convert_script", help="llama.cpp's convert_hf_to_gguf.py: with it, llama.cpp races too")
    parser.add_argument(
        "--trained_model",
        help="a model train.py wrote beside sample/ (`python sample_data.py && python train.py` write both: out/)",
    )
    parser.add_argument("--transformers_process", nargs="+", help=argparse.SUPPRESS)  # the reference process
    args = parser.parse_args()
    if args.transformers_process:
        model_dir, *ids = args.transformers_process
        transformers_process(model_dir, [int(i) for i in ids], args.new_tokens)
        return

    no_llama_cpp = llama_cpp_available(args.convert_script)
    # Compiled libraries go here, so that the first compile is a cold one (and is cleaned up).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir = tempfile.mkdtemp()
    tokenizer = Tokenizer(str(SHARED / "llama_tokenizer.model"))
    torch.manual_seed(0)
    config = llama_config(args.dim, args.n_layers, max_positions=2048)
    hf_model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model_dir = tempfile.mkdtemp()
    threads = torch.get_num_threads()
    try:
        hf_model.save_pretrained(model_dir)
        shutil.copyfile(SHARED / "llama_tokenizer.model", os.path.join(model_dir, "tokenizer.model"))
        gguf = os.path.join(model_dir, "model-bf16.gguf")
        if no_llama_cpp is None:
            convert = [sys.executable, args.convert_script, model_dir, "--outtype", "bf16", "--outfile", gguf]
            subprocess.run(convert, capture_output=True, check=True)
        bf16 = load_model(model_dir, dtype=torch.bfloat16)
        int8 = load_model(model_dir, dtype=torch.bfloat16)
        bf16_bytes = weight_bytes(bf16)
        use_cpu_decoding_layout(bf16)  # as generate.py's command line does on the CPU
        quantize_int8(int8)  # as --quantize int8 does
        int8_bytes = weight_bytes(int8)
        ids = tokenizer.encode(format_prompt(PROMPT), bos=True)
        n = args.new_tokens
        # A random model that said EOS early would time a shorter answer on the command line.
        assert len(generate_ids(bf16, [ids], n, tokenizer.eos_id)[0]) == n, "EOS before the end: change the seed"

        # In-process decoding against the bandwidth.
        bandwidth = stream_bandwidth(5)
        speed = dict.fromkeys(["bf16", "int8"], 0.0)
        for _ in range(args.runs):
            for name, model in (("bf16", bf16), ("int8", int8)):
                speed[name] = max(speed[name], decode_speed(model, [ids], n))
        first_start = {}
        for name in ["bf16", "int8"] if args.compile else []:
            seconds = []
            for _ in range(2):  # the run that compiles, then a later one that loads the library
                model = load_model(model_dir, dtype=torch.bfloat16)
                if name == "int8":
                    quantize_int8(model)
                start = time.perf_counter()
                compiled = CompiledSteps(model)
                Engine(model, -1, 1, max_len=512, compiled=compiled).compiled.get(1)
                seconds.append(time.perf_counter() - start)
            speed[f"{name} --compile"] = max(decode_speed(model, [ids], n, compiled) for _ in range(args.runs))
            first_start[name] = seconds

        # Whole processes (with --compile, its libraries are on disk by now, for the cache length it uses).
        ours_command = [sys.executable, str(ROOT / "generate.py"), "--model_path", model_dir, "--dtype", "bfloat16"]
        ours_command += ["--temperature", "0", "--max_new_tokens", str(n), PROMPT]
        reference_command = [sys.executable, __file__, "--new_tokens", str(n), "--transformers_process", model_dir]
        reference_command += [str(i) for i in ids]
        llama_command = [sys.executable, "-c", LLAMA_CPP_PROCESS, gguf, str(threads), str(n), *map(str, ids)]
        llama_decode = []

        def reference_process() -> None:
            done = subprocess.run(reference_command, capture_output=True, text=True, check=True)
            assert int(done.stdout) == n, f"transformers stopped after {done.stdout.strip()} tokens"

        def llama_process() -> None:
            done = subprocess.run(llama_command, capture_output=True, text=True, check=True)
            tokens, decode = done.stdout.split()
            assert int(tokens) == n, f"llama.cpp stopped after {tokens} tokens"
            llama_decode.append(float(decode))

        def compiled_process() -> None:
            done = subprocess.run(ours_command + ["--compile"], capture_output=True, text=True, check=True)
            assert "compiling" not in done.stderr, "generate.py --compile compiled again"

        processes = {"generate.py": partial(subprocess.run, ours_command, capture_output=True, check=True)}
        if args.compile:
            subprocess.run(ours_command + ["--compile"], capture_output=True, check=True)  # its cache length
            processes["generate.py --compile"] = compiled_process
        processes["transformers"] = reference_process
        if no_llama_cpp is None:
            processes["llama.cpp"] = llama_process
        process_seconds = best_of(args.runs, processes)
        if llama_decode:
            speed["llama.cpp"] = max(llama_decode)

        # Batched.
        records = read_records(str(SHARED / "alpaca_sample.json"))
        batched = {}
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = [tokenizer.encode(format_prompt(i, x), bos=True) for i, x, _ in records[:batch_size]]
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            attention_mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
            m = args.batched_new_tokens

            def reference_batch(input_ids=input_ids, attention_mask=attention_mask, m=m) -> None:
                with torch.inference_mode():
                    hf_model.generate(
                        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=m,
                        min_new_tokens=m, pad_token_id=0,
                    )  # fmt: skip

            sides = {"ours": partial(generate_ids, bf16, prompts, m, -1), "transformers": reference_batch}
            seconds = best_of(args.runs, sides)
            batched[batch_size] = (min(len(p) for p in prompts), width, m * batch_size / seconds["ours"])
            batched[batch_size] += (m * batch_size / seconds["transformers"],)
        bandwidth_after = stream_bandwidth(5)
    finally:
        shutil.rmtree(model_dir)
        shutil.rmtree(inductor_dir)

    params = sum(p.numel() for p in hf_model.parameters()) / 1e6
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, {threads} threads; dim {args.dim}, "
          f"{args.n_layers} layers, {params:.0f}M parameters, bf16; prompt {len(ids)} tokens + {n} new, greedy; "
          f"best of {args.runs}")  # fmt: skip
    print(f"stream bandwidth (sum of 1 GiB fp32, best of 5, before / after): {bandwidth / 1e9:.1f} / "
          f"{bandwidth_after / 1e9:.1f} GB/s")  # fmt: skip
    if no_llama_cpp:
        print(f"llama.cpp left out: {no_llama_cpp}")
    print("\nwhole process, batch 1, from start to the last token:")
    for name, seconds in process_seconds.items():
        print(f"  {name:<24} {seconds:6.1f} s  {n / seconds:6.1f} tok/s")
    print("\nin-process decoding (the steps after the prompt):")
    for name, tokens_per_second in speed.items():
        n_bytes = int8_bytes if name.startswith("int8") else bf16_bytes
        limit = max(bandwidth, bandwidth_after) / n_bytes
        print(f"  {name:<24} {tokens_per_second:6.1f} tok/s  {tokens_per_second / limit:4.0%} of the limit "
              f"({n_bytes / 1e6:.0f} MB of weights a token: {limit:.1f} tok/s)")  # fmt: skip
    for name, (compiling, loading) in first_start.items():
        print(
            f"  --compile's first start, {name}: {compiling:.0f} s compiling; a later run loads it in {loading:.1f} s"
        )
    for batch_size, (shortest, longest, ours, reference) in batched.items():
        print(f"  batch {batch_size} (prompts {shortest}-{longest} tokens) + {args.batched_new_tokens} new, bf16: "
              f"ours {ours:.1f} tok/s, transformers {reference:.1f}: {ours / reference:.2f}x")  # fmt: skip

    print("\nratios (goal in brackets):")
    reference = process_seconds["transformers"]
    print(f"  generate.py / transformers, whole process, uncompiled: {reference / process_seconds['generate.py']:.2f}x"
          " [>= 2x]")  # fmt: skip
    for name in ("generate.py", "generate.py --compile"):
        if "llama.cpp" in process_seconds and name in process_seconds:
            ratio = process_seconds["llama.cpp"] / process_seconds[name]
            print(f"  {name} / llama.cpp, whole process: {ratio:.2f}x [> 1x, from the first request]")
    for name in ("bf16", "bf16 --compile"):
        if "llama.cpp" in speed and name in speed:
            print(f"  {name} / llama.cpp, decoding steps: {speed[name] / speed['llama.cpp']:.2f}x")
    print(f"  int8 / bf16, uncompiled: {speed['int8'] / speed['bf16']:.2f}x [>= 1.7x]")
    if args.compile:
        print(f"  int8 / bf16, --compile: {speed['int8 --compile'] / speed['bf16 --compile']:.2f}x [>= 1.7x]")
    if args.trained_model:
        share, same_answers, n_prompts = agreement(args.trained_model, 20, 64)
        print(f"{args.trained_model}: int8's greedy choice is bf16's at {share:.2%} of the positions of bf16's "
              f"answers; {same_answers}/{n_prompts} answers the same")  # fmt: skip


if __name__ == "__main__":
    main()

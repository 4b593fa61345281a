"""bf16 and int8 decoding of generate.py against transformers and against the memory bandwidth, in one run, on
one random LLaMA (8 layers x 768 by default, saved by transformers in bf16) and greedy answers:

1. Whole process: `python generate.py --dtype bfloat16 --temperature 0 --max_new_tokens N PROMPT` against a
   process that loads the same model in transformers (bf16) and runs its `generate` on the same prompt ids.
   With --compile also `generate.py --compile`, once its package is on disk (a later run's cost).
2. In-process decoding speed (the steps after the prompt, timed as `--stats` times them) of bf16 as the command
   line runs it on the CPU (`use_cpu_decoding_layout`) and of `--quantize int8`, against the limit the memory
   sets: the weight bytes every token reads / the stream bandwidth of a sum over a 1 GiB tensor.
   With --compile, both again with `--compile` (`compile_decoding`): the first call, which compiles into an
   empty cache directory, and a later run's first call, which loads the package, timed apart.
3. Batched: batch 8 and 16, left-padded Alpaca prompts of different lengths, bf16, generated tokens/s of
   `generate_ids` against transformers' left-padded `generate`.
4. With --trained_model: how often int8's greedy choice is bf16's, over 20 held-out prompts.

Every side runs --runs times, the sides in turn, and the best run counts (the machine is shared).

    python bench/bench_decode.py --runs 3 --trained_model sample_out [--compile]
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
from generate import Int8Linear, compile_decoding, generate_ids, quantize_int8, record_time, use_cpu_decoding_layout  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
PROMPT = "Give three tips for staying healthy."


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


def decode_speed(model, prompt_ids: list[list[int]], new_tokens: int, decode_step=None) -> float:
    """Tokens/s of the decoding steps alone, all rows counted."""
    times = [time.perf_counter()]
    on_token = partial(record_time, times, None)
    generate_ids(model, prompt_ids, new_tokens, eos_id=-1, on_token=on_token, decode_step=decode_step)
    return (len(times) - 2) * len(prompt_ids) / (times[-1] - times[1])


def products_speed(model, runs: int) -> float:
    """Tokens/s of a step that did nothing but its linear products, each on one row: where the rest of a step
    goes is the per-token overhead (attention, the elementwise work, Python)."""
    a = model.model_args
    products = [(model.lm_head, a.dim)]
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        products += [(attn.qkv_proj, a.dim), (attn.o_proj, a.dim), (mlp.gate_up_proj, a.dim)]
        products.append((mlp.down_proj, a.hidden_dim))
    inputs = [(product, torch.randn(1, 1, width, dtype=torch.bfloat16)) for product, width in products]

    def step() -> None:
        with torch.inference_mode():
            for product, x in inputs:
                product(x)

    step()
    return 1 / min(best_of(runs, {"step": lambda: [step() for _ in range(10)]}).values()) * 10


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=384, help="batch 1 (default: 384)")
    parser.add_argument("--batched_new_tokens", type=int, default=128)
    parser.add_argument("--batch_sizes", default="8,16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also bf16 and int8 with --compile, in process")
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

    if args.compile:  # compiled packages go here, so that the first compile is a cold one (and is cleaned up)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
    tokenizer = Tokenizer(str(SHARED / "llama_tokenizer.model"))
    torch.manual_seed(0)
    config = llama_config(args.dim, args.n_layers, max_positions=2048)
    hf_model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model_dir = tempfile.mkdtemp()
    try:
        hf_model.save_pretrained(model_dir)
        shutil.copyfile(SHARED / "llama_tokenizer.model", os.path.join(model_dir, "tokenizer.model"))
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
        products = {"bf16": products_speed(bf16, args.runs), "int8": products_speed(int8, args.runs)}
        compiled = {}
        for name in ["bf16", "int8"] if args.compile else []:
            first_calls = []
            for _ in range(2):  # the run that compiles, then a later one that loads the package
                model = load_model(model_dir, dtype=torch.bfloat16)
                if name == "int8":
                    quantize_int8(model)
                start = time.perf_counter()
                step = compile_decoding(model)
                generate_ids(model, [ids], n, -1, decode_step=step)
                first_calls.append(time.perf_counter() - start)
            compiled[name] = (*first_calls, max(decode_speed(model, [ids], n, step) for _ in range(args.runs)))
        bandwidth_after = stream_bandwidth(5)

        # Whole processes (with --compile, its packages are on disk by now).
        ours_command = [sys.executable, str(ROOT / "generate.py"), "--model_path", model_dir, "--dtype", "bfloat16"]
        ours_command += ["--temperature", "0", "--max_new_tokens", str(n), PROMPT]
        reference_command = [sys.executable, __file__, "--new_tokens", str(n), "--transformers_process", model_dir]
        reference_command += [str(i) for i in ids]

        def reference_process() -> None:
            done = subprocess.run(reference_command, capture_output=True, text=True, check=True)
            assert int(done.stdout) == n, f"transformers stopped after {done.stdout.strip()} tokens"

        processes = {
            "generate.py": partial(subprocess.run, ours_command, capture_output=True, check=True),
            "transformers": reference_process,
        }
        if args.compile:
            compiled_command = ours_command + ["--compile"]

            def compiled_process() -> None:
                done = subprocess.run(compiled_command, capture_output=True, text=True, check=True)
                assert "compiling" not in done.stderr, "generate.py --compile compiled again"

            processes["generate.py --compile"] = compiled_process
        process_seconds = best_of(args.runs, processes)

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
    finally:
        shutil.rmtree(model_dir)
        if args.compile:
            shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"])

    params = sum(p.numel() for p in hf_model.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; dim {args.dim}, {args.n_layers} layers, "
        f"{params:.0f}M parameters; prompt {len(ids)} tokens + {n} new, greedy; best of {args.runs}"
    )
    reference = process_seconds.pop("transformers")
    for name, ours in process_seconds.items():
        print(f"whole process, bf16, batch 1: {name} {ours:.1f} s ({n / ours:.1f} tok/s), transformers "
              f"{reference:.1f} s ({n / reference:.1f} tok/s): {reference / ours:.2f}x")  # fmt: skip
    print(f"stream bandwidth (sum of 1 GiB fp32, best of 5, before / after): {bandwidth / 1e9:.1f} / "
          f"{bandwidth_after / 1e9:.1f} GB/s")  # fmt: skip
    for name, n_bytes in (("bf16", bf16_bytes), ("int8", int8_bytes)):
        limit = max(bandwidth, bandwidth_after) / n_bytes
        print(f"in-process decoding, {name}: {speed[name]:.1f} tok/s; {n_bytes / 1e6:.0f} MB of weights a token, "
              f"limit {limit:.1f} tok/s: {speed[name] / limit:.0%} of it; the products alone "
              f"{products[name]:.1f} tok/s, {products[name] / limit:.0%}")  # fmt: skip
    print(f"int8 / bf16 decoding: {speed['int8'] / speed['bf16']:.2f}x")
    for name, (compiling, loading, speed_compiled) in compiled.items():
        limit = max(bandwidth, bandwidth_after) / (bf16_bytes if name == "bf16" else int8_bytes)
        print(f"--compile, {name}: {speed_compiled:.1f} tok/s, {speed_compiled / limit:.0%} of the limit, "
              f"{speed_compiled / speed['bf16']:.2f}x bf16 uncompiled; first call {compiling:.0f} s compiling, "
              f"{loading:.1f} s in a later run (the library loaded)")  # fmt: skip
    for batch_size, (shortest, longest, ours, reference) in batched.items():
        print(f"batch {batch_size} (prompts {shortest}-{longest} tokens, left-padded) + {args.batched_new_tokens} "
              f"new, bf16: ours {ours:.1f} tok/s, transformers {reference:.1f}: {ours / reference:.2f}x")  # fmt: skip
    if args.trained_model:
        share, same_answers, n_prompts = agreement(args.trained_model, 20, 64)
        print(f"{args.trained_model}: int8's greedy choice is bf16's at {share:.2%} of the positions of bf16's "
              f"answers; {same_answers}/{n_prompts} answers the same")  # fmt: skip


if __name__ == "__main__":
    main()

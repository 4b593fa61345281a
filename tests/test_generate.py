"""The engine's batch API and generate.py: greedy decoding against transformers' generate, batching, the context
limit, sampling, streaming text and the command line."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

import engine
import generate
from checkpoint import load_model
from data import format_prompt
from engine import TextStream, generate_ids, nucleus, sample
from optimize import CompiledSteps, library_path, use_cpu_decoding_layout, weights_digest
from tokenizer import Tokenizer

MAX_SEQ_LEN = 128
PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Rewrite the following sentence in the passive voice, and explain what changed: The cat chased the mouse.",
]


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return Tokenizer(str(tokenizer_model))


def encode_all(tokenizer, prompts):
    return [tokenizer.encode(format_prompt(p), bos=True) for p in prompts]


@pytest.mark.parametrize("layout", ["as loaded", "cpu decoding layout", "compiled"])
def test_greedy_matches_transformers(model_dir, tokenizer, layout):
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load_model(str(model_dir))
    compiled = None
    if layout == "cpu decoding layout":  # what the command line does on the CPU
        use_cpu_decoding_layout(model)
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())  # all oneDNN-packed
    elif layout == "compiled":  # --compile
        compiled = CompiledSteps(model)
    prompt_ids = encode_all(tokenizer, PROMPTS)
    ours = generate_ids(model, prompt_ids, 64, tokenizer.eos_id, compiled=compiled)  # one batch
    for ids, answer in zip(prompt_ids, ours, strict=True):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64, pad_token_id=0)
        expected = out[0, len(ids) :].tolist()
        # Neither side may stop early at EOS, or the comparison would be shorter than it claims.
        assert len(expected) == len(answer) == 64
        assert answer == expected


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16 products")
def test_bf16_decoding_layout_agrees_with_transformers(model_dir, tokenizer):
    """In bf16 the CPU layout swaps every linear layer for oneDNN-packed weights: over a prompt and the answer
    it decoded, the logits stay those of transformers' bf16 model up to bf16 rounding."""
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model = load_model(str(model_dir), dtype=torch.bfloat16)
    use_cpu_decoding_layout(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    prompt_ids = encode_all(tokenizer, PROMPTS[:1])
    answer = generate_ids(model, prompt_ids, 32, eos_id=-1)[0]
    tokens = torch.tensor([prompt_ids[0] + answer])
    with torch.inference_mode():
        expected = reference(tokens).logits.float()
        ours = model(tokens).float()
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    assert (ours - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16 products")
def test_bf16_compiled_decoding_agrees_with_transformers(model_dir, tokenizer):
    """Each token the compiled bf16 step chose greedily is, up to bf16 rounding, the one transformers' bf16
    model puts first after the same prefix."""
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model = load_model(str(model_dir), dtype=torch.bfloat16)
    prompt_ids = encode_all(tokenizer, PROMPTS[:1])
    answer = generate_ids(model, prompt_ids, 32, eos_id=-1, compiled=CompiledSteps(model))[0]
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt_ids[0] + answer])).logits[0]
    expected = logits[len(prompt_ids[0]) - 1 : -1].argmax(-1)
    assert (expected == torch.tensor(answer)).float().mean() >= 0.9


def test_batch_matches_one_by_one(model, tokenizer):
    prompt_ids = [tokenizer.encode(p, bos=True) for p in ["Hi", PROMPTS[0], format_prompt(PROMPTS[2])]]
    assert len({len(ids) for ids in prompt_ids}) == 3
    singles = [generate_ids(model, [ids], 24, tokenizer.eos_id)[0] for ids in prompt_ids]
    assert generate_ids(model, prompt_ids, 24, tokenizer.eos_id) == singles
    # A row that stops early (here: at a token it produces, taken as EOS) must not change the others.
    eos = singles[1][5]
    singles = [generate_ids(model, [ids], 24, eos)[0] for ids in prompt_ids]
    assert len(singles[1]) <= 5
    assert generate_ids(model, prompt_ids, 24, eos) == singles


def test_on_token_can_finish_a_row(model, tokenizer):
    """A row that on_token finishes (a stop string, a reader gone) keeps its tokens so far; the others go on."""
    prompt_ids = encode_all(tokenizer, PROMPTS)
    full = generate_ids(model, prompt_ids, 12, tokenizer.eos_id)
    tokens = [0, 0, 0]

    def stop_second_row_after_three(row, token):
        tokens[row] += 1
        return row == 1 and tokens[row] == 3

    cut = generate_ids(model, prompt_ids, 12, tokenizer.eos_id, on_token=stop_second_row_after_three)
    assert len(full[1]) == 12 and cut[1] == full[1][:3]
    assert cut[0] == full[0] and cut[2] == full[2]


def test_compiled_step_is_reused_by_later_calls_and_runs(monkeypatch, tmp_path, model_dir, model, tokenizer):
    """On the CPU --compile compiles the step once into a library on disk. A later call with the same batch size
    and a shorter prompt + answer runs it as it is, and so does a later run (the model loaded again): no compile,
    and still the uncompiled model's answers, prompts of different lengths and an early EOS included."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled_model = load_model(str(model_dir))
    compiled = CompiledSteps(compiled_model)
    generate_ids(compiled_model, encode_all(tokenizer, PROMPTS), 32, tokenizer.eos_id, compiled=compiled)
    assert len(list(tmp_path.glob("decoding/*/step.so"))) == 1
    shorter = [tokenizer.encode(p, bos=True) for p in ["Hi", PROMPTS[0], PROMPTS[1]]]
    expected = generate_ids(model, shorter, 16, tokenizer.eos_id)
    eos = expected[1][5]  # a token the second row produces, taken as EOS: that row stops early
    expected_with_eos = generate_ids(model, shorter, 16, eos)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch._inductor, "aot_compile", no_compiling)
    assert generate_ids(compiled_model, shorter, 16, tokenizer.eos_id, compiled=compiled) == expected
    assert generate_ids(compiled_model, shorter, 16, eos, compiled=compiled) == expected_with_eos
    later_run = load_model(str(model_dir))
    assert generate_ids(later_run, shorter, 16, eos, compiled=CompiledSteps(later_run)) == expected_with_eos
    assert len(expected_with_eos[1]) <= 5


def test_compiled_steps_are_told_apart_by_model_and_batch(model_dir):
    """A compiled step is found by a digest of the model: the same checkpoint loaded twice finds the same one, a
    model that differs in one weight by a little, or in a setting, does not."""
    same, changed = load_model(str(model_dir)), load_model(str(model_dir))
    with torch.no_grad():
        changed.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    first = load_model(str(model_dir))
    path = library_path(weights_digest(first), first, 1, 128)
    assert library_path(weights_digest(same), same, 1, 128) == path
    assert library_path(weights_digest(changed), changed, 1, 128) != path
    assert library_path(weights_digest(same), same, 2, 128) != path
    same.model_args.rope_theta *= 2  # the same weights, another model
    assert library_path(weights_digest(same), same, 1, 128) != path


def test_context_limit(model, tokenizer):
    long_prompt = [tokenizer.bos_id] + list(range(1000, 1000 + MAX_SEQ_LEN - 6))  # room for 5 new tokens
    short_prompt = tokenizer.encode("Hi", bos=True)
    alone = generate_ids(model, [short_prompt], 20, tokenizer.eos_id)[0]
    long_answer, short_answer = generate_ids(model, [long_prompt, short_prompt], 20, tokenizer.eos_id)
    assert len(long_answer) == 5  # prompt + answer == max_seq_len, not more
    assert short_answer == alone and len(alone) == 20  # a long neighbour does not shorten the others
    assert len(generate_ids(model, [long_prompt + [7] * 4], 20, tokenizer.eos_id)[0]) == 1
    with pytest.raises(ValueError, match="prompt 2 is 128 tokens long"):
        generate_ids(model, [short_prompt, long_prompt + [7] * 5], 20, tokenizer.eos_id)


NEW_PROMPT_LENGTH_EVERY_CALL = """
import torch
from engine import generate_ids
from model import ModelArgs, Transformer, cap_cpu_kernel_caches
from optimize import use_cpu_decoding_layout
if CAPPED:
    cap_cpu_kernel_caches()
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000, max_seq_len=256))
use_cpu_decoding_layout(model)
rss = []
for length in range(8, 158):
    generate_ids(model, [list(range(1, length + 1))], 2, eos_id=-1)
    rss.append(int(open("/proc/self/statm").read().split()[1]))
print(rss[79], rss[-1])
"""


def test_memory_stays_flat_for_prompts_of_new_lengths():
    """The CPU keeps the matmul kernels it builds for each new prompt length unless model.cap_cpu_kernel_caches
    caps them, as generate.py does on the CPU: 150 prompts, each one token longer than the last. Uncapped,
    resident memory grows by a few MB a prompt (on an AMD EPYC), which this test must see too, or it could not
    tell: where it does not grow, the test is skipped."""
    growth = {}
    for capped in (False, True):
        script = f"CAPPED = {capped}\n" + NEW_PROMPT_LENGTH_EVERY_CALL
        out = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(engine.__file__),
                             capture_output=True, text=True, check=True)  # fmt: skip
        at_80, at_150 = map(int, out.stdout.split())
        growth[capped] = at_150 / at_80
    assert growth[True] <= 1.05, growth
    if growth[False] < 1.2:  # seen on a 2-core Intel Xeon (AVX-512, no AMX): nothing there to cap
        pytest.skip(f"uncapped, this CPU's memory grew only {growth[False]:.3f}x: the cap cannot be told apart here")


def test_sampling_repeats_with_a_seed(model, tokenizer):
    prompt_ids = encode_all(tokenizer, PROMPTS)
    settings = dict(max_new_tokens=16, eos_id=tokenizer.eos_id, temperature=1.0, top_p=0.95, top_k=50)
    first = generate_ids(model, prompt_ids, seed=123, **settings)
    assert generate_ids(model, prompt_ids, seed=123, **settings) == first
    assert generate_ids(model, prompt_ids, seed=124, **settings) != first


def record_last_logits(model):
    """Collects the last-position logits of every forward pass; returns the list and the hook's handle."""
    steps = []
    handle = model.register_forward_hook(lambda module, args, logits: steps.append(logits[:, -1].float()))
    return steps, handle


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_top_k_draws_only_among_the_k_most_likely(model, tokenizer, temperature):
    steps, handle = record_last_logits(model)
    try:
        answers = generate_ids(
            model, encode_all(tokenizer, PROMPTS), 40, tokenizer.eos_id, temperature=temperature, top_k=5, seed=0
        )
    finally:
        handle.remove()
    ranks = []
    for row, answer in enumerate(answers):
        for step, token in enumerate(answer):
            logits = steps[step][row]
            ranks.append(int((logits > logits[token]).sum()))  # how many tokens are more likely
    assert max(ranks) < 5
    assert len(set(ranks)) > 1  # really sampled, not the argmax every time


def test_top_p_draws_only_from_the_nucleus(model, tokenizer):
    top_p, temperature = 0.6, 0.002  # sharp enough for nuclei of a few tokens on this near-uniform model
    steps, handle = record_last_logits(model)
    try:
        answers = generate_ids(
            model, encode_all(tokenizer, PROMPTS), 40, tokenizer.eos_id, temperature=temperature, top_p=top_p, seed=0
        )
    finally:
        handle.remove()
    ranks, nucleus_sizes = [], []
    for row, answer in enumerate(answers):
        for step, token in enumerate(answer):
            probs = torch.softmax(steps[step][row].double() / temperature, dim=-1)
            sorted_probs = probs.sort(descending=True).values
            nucleus_sizes.append(int((sorted_probs.cumsum(0) < top_p).sum()) + 1)
            ranks.append(int((probs > probs[token]).sum()))
            assert ranks[-1] < nucleus_sizes[-1]
    assert len(set(ranks)) > 1 and max(nucleus_sizes) < 100  # a real test: sampled, and a small nucleus


def test_sample_follows_the_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 40_000
    generator = torch.Generator().manual_seed(0)

    def frequencies(**settings):
        tokens = sample(logits.expand(draws, -1), generator=generator, **settings)
        return torch.bincount(tokens, minlength=len(logits)).double() / draws

    probs = torch.softmax(logits.double(), dim=0)
    torch.testing.assert_close(frequencies(temperature=1.0, top_p=1.0, top_k=0), probs, atol=0.01, rtol=0)
    cold = torch.softmax(logits.double() / 0.5, dim=0)
    torch.testing.assert_close(frequencies(temperature=0.5, top_p=1.0, top_k=0), cold, atol=0.01, rtol=0)
    top3 = torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(4, dtype=torch.double)])
    torch.testing.assert_close(frequencies(temperature=1.0, top_p=1.0, top_k=3), top3, atol=0.01, rtol=0)
    # The nucleus for 0.7: the first two hold 0.62, so the third (reaching 0.77) is the last one in.
    assert probs[:2].sum() < 0.7 < probs[:3].sum()
    torch.testing.assert_close(frequencies(temperature=1.0, top_p=0.7, top_k=0), top3, atol=0.01, rtol=0)
    greedy = sample(logits.expand(4, -1), temperature=0.0, top_p=1.0, top_k=0, generator=generator)
    assert greedy.tolist() == [0, 0, 0, 0]


def test_nucleus_keeps_the_tokens_transformers_keeps():
    """The nucleus found among the most likely tokens first (the whole vocabulary when it may reach past them) is
    the one transformers' TopPLogitsWarper finds by sorting the whole vocabulary, the probabilities unchanged."""
    from transformers.generation.logits_process import TopPLogitsWarper

    sizes = []
    for temperature in (0.05, 0.7, 5.0):
        logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / temperature
        probs = torch.softmax(logits, dim=-1)
        for top_p in (0.5, 0.9, 0.99):
            kept = nucleus(probs, top_p)
            theirs = TopPLogitsWarper(top_p)(None, logits) > float("-inf")
            assert torch.equal(kept > 0, theirs)
            assert torch.equal(kept[theirs], probs[theirs])
            sizes += theirs.sum(dim=-1).tolist()
    # Nuclei within the first candidates, and nuclei past them.
    assert min(sizes) < engine.NUCLEUS_CANDIDATES < max(sizes), sizes


def test_text_stream_never_shows_half_a_character(tokenizer):
    text = "Grüße, 世界! 🙂🎉 done"
    ids = tokenizer.encode(text)
    assert any(tokenizer.sp.IsByte(i) for i in ids)  # the emoji are spelled in byte-fallback pieces
    stream = TextStream(tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.add(tokenizer.eos_id)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.finish() == text
    # Bytes that never complete a character are shown at the end, as decode shows them.
    stream = TextStream(tokenizer)
    cut = ids[: ids.index(next(i for i in ids if tokenizer.sp.IsByte(i))) + 1]
    assert "".join(stream.add(i) for i in cut) + stream.finish() == tokenizer.decode(cut)


def test_generate_returns_and_streams_the_answers(model, tokenizer):
    prompts = [format_prompt(p) for p in PROMPTS]
    answers = engine.generate(model, tokenizer, prompts, max_new_tokens=32)
    expected = generate_ids(model, [tokenizer.encode(p, bos=True) for p in prompts], 32, tokenizer.eos_id)
    assert answers == [tokenizer.decode(ids) for ids in expected]
    streamed = ["" for _ in prompts]

    def on_text(i, text):
        streamed[i] += text

    assert engine.generate(model, tokenizer, prompts, max_new_tokens=32, on_text=on_text) == answers
    assert streamed == answers


# ---------------------------------------------------------------------------------------------------------
# Command line


class Writes(io.StringIO):
    """A stdout that remembers each write, to see that the answer came out piece by piece."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, text):
        if text:
            self.chunks.append(text)
        return super().write(text)


def run_cli(monkeypatch, args, stdin=""):
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    generate.main(args)
    return out


def answer(model, tokenizer, prompt, max_new_tokens=40):
    return engine.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]


def test_cli_streams_only_the_answer(monkeypatch, model_dir, model, tokenizer):
    out = run_cli(
        monkeypatch, ["--model_path", str(model_dir), "--temperature", "0", "--max_new_tokens", "40"] + PROMPTS[:1]
    )
    expected = answer(model, tokenizer, format_prompt(PROMPTS[0]))
    assert out.getvalue() == expected + "\n"
    assert len(out.chunks) > 10  # streamed token by token, not printed at the end


def test_cli_input_and_raw(monkeypatch, model_dir, model, tokenizer):
    common = ["--model_path", str(model_dir), "--temperature", "0", "--max_new_tokens", "40"]
    out = run_cli(monkeypatch, common + ["Summarize this.", "--input", "Cats chase mice."])
    assert out.getvalue() == answer(model, tokenizer, format_prompt("Summarize this.", "Cats chase mice.")) + "\n"
    out = run_cli(monkeypatch, common + ["--raw", "Once upon a time"])
    assert out.getvalue() == answer(model, tokenizer, "Once upon a time") + "\n"


def test_cli_prompts_from_file_and_stdin(monkeypatch, tmp_path, model_dir, model, tokenizer):
    common = ["--model_path", str(model_dir), "--temperature", "0", "--max_new_tokens", "40", "--batch_size", "2"]
    expected = [answer(model, tokenizer, format_prompt(p)) for p in PROMPTS]
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(PROMPTS) + "\n\n")
    out = run_cli(monkeypatch, common + ["--prompts", str(lines)])
    assert out.getvalue() == "\n\n".join(expected) + "\n"

    out = run_cli(monkeypatch, common + ["--prompts", "-", "--output_format", "jsonl"], stdin="\n".join(PROMPTS))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records == [{"prompt": p, "input": "", "answer": a} for p, a in zip(PROMPTS, expected, strict=True)]

    alpaca = [
        {"instruction": "Summarize this.", "input": "Cats chase mice.", "output": "ignored"},
        {"instruction": PROMPTS[1]},
    ]
    records_file = tmp_path / "prompts.json"
    records_file.write_text(json.dumps(alpaca))
    out = run_cli(monkeypatch, common + ["--prompts", str(records_file), "--output_format", "jsonl"])
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["answer"] for r in records] == [
        answer(model, tokenizer, format_prompt("Summarize this.", "Cats chase mice.")),
        answer(model, tokenizer, format_prompt(PROMPTS[1])),
    ]
    assert records[0]["input"] == "Cats chase mice."


def test_cli_sampled_answers_do_not_depend_on_the_batch(monkeypatch, tmp_path, model_dir):
    """Each prompt samples from a seed of its own drawn from --seed: decoded one at a time or three together
    (joining as rows free up), the answers are the same, and another seed changes them."""
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(PROMPTS))
    args = ["--model_path", str(model_dir), "--temperature", "1", "--max_new_tokens", "20", "--prompts", str(lines)]
    one_at_a_time = run_cli(monkeypatch, args + ["--seed", "5", "--batch_size", "1"]).getvalue()
    assert run_cli(monkeypatch, args + ["--seed", "5", "--batch_size", "2"]).getvalue() == one_at_a_time
    assert run_cli(monkeypatch, args + ["--seed", "6", "--batch_size", "2"]).getvalue() != one_at_a_time


def test_cli_compile_gives_the_same_answers(monkeypatch, tmp_path, model_dir, model, tokenizer):
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(PROMPTS))
    args = ["--model_path", str(model_dir), "--temperature", "0", "--max_new_tokens", "40", "--prompts", str(lines)]
    out = run_cli(monkeypatch, args + ["--compile"])
    assert out.getvalue() == "\n\n".join(answer(model, tokenizer, format_prompt(p)) for p in PROMPTS) + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_path", "{tmp}/missing", "Hi"], "{tmp}/missing: checkpoint directory not found"),
        (["--prompts", "{tmp}/missing.txt"], "missing.txt"),
        (["--temperature", "-1", "Hi"], "--temperature must be >= 0, got -1.0"),
        (["--top_p", "0", "Hi"], "--top_p must be in (0, 1], got 0.0"),
        (["--top_p", "1.5", "Hi"], "--top_p must be in (0, 1], got 1.5"),
        (["--top_k", "-2", "Hi"], "--top_k must be >= 0"),
        (["--max_new_tokens", "0", "Hi"], "--max_new_tokens must be >= 1"),
        (["--prompts", "{tmp}/bad.json"], "bad.json: invalid JSON at line 1, column 23"),
        (["--prompts", "{tmp}/no_instruction.json"], "no_instruction.json: record 1: missing field 'instruction'"),
        (["--prompts", "{tmp}/empty.txt"], "empty.txt: no prompts"),
        (["--raw", "--input", "x", "Hi"], "--raw uses the prompt as it is"),
        (["--raw", "--prompts", "{tmp}/with_input.json"], "with_input.json: record 1 has an input, which --raw"),
        ([], "give one prompt, or --prompts FILE"),
        (["--output_format", "xml", "Hi"], "invalid choice: 'xml'"),
        (["--device", "tpu", "Hi"], "--device 'tpu': expected cpu, cuda or cuda:N"),
        (["--raw", " ".join(["word"] * MAX_SEQ_LEN)], "prompt 1 is 129 tokens long, but the model's context is 128"),
        (["--tokenizer", "{tmp}/bad.json", "Hi"], "bad.json: not a SentencePiece model"),
    ],
)
def test_cli_bad_input_is_one_line(monkeypatch, capsys, tmp_path, model_dir, args, message):
    (tmp_path / "bad.json").write_text('[{"instruction": "a"},')
    (tmp_path / "no_instruction.json").write_text('[{"instruction": "a"}, {"input": "b"}]')
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "with_input.json").write_text('[{"instruction": "a"}, {"instruction": "b", "input": "c"}]')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model_path" not in args:
        args = ["--model_path", str(model_dir)] + args
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, args)
    assert exit_info.value.code not in (0, None)
    error = str(exit_info.value.code)  # sys.exit("error: ...") prints this, alone, to stderr
    assert error.startswith("error: ") and "\n" not in error
    assert message.replace("{tmp}", str(tmp_path)) in error


def test_cli_default_model_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: no model in \./out .*pass --model_path DIR$"):
        generate.main(["Hi"])


def test_cli_end_to_end_in_a_process(model_dir, model, tokenizer):
    """The real entry point: stdin, stdout and stderr of a separate process, and no traceback on bad input."""
    command = [sys.executable, str(generate.__file__), "--model_path", str(model_dir), "--max_new_tokens", "20"]
    done = subprocess.run(
        command + ["--temperature", "0", "--prompts", "-"], input="\n".join(PROMPTS[:2]), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = [answer(model, tokenizer, format_prompt(p), max_new_tokens=20) for p in PROMPTS[:2]]
    assert done.stdout == "\n\n".join(expected) + "\n"
    done = subprocess.run(command + ["--temperature", "-1", "Hi"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "error: --temperature must be >= 0, got -1.0\n"
    done = subprocess.run(command + ["--prompts", "/nonexistent/prompts.txt"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr

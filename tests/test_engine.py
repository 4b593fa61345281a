"""The engine's per-step scheduling: requests that join and leave mid-decode get the answers they get alone, a full
queue refuses, a cancelled request frees its row, a step that raises fails only its own rows, and the logits it
hands out are transformers'."""

import pytest
import torch
from transformers import LlamaForCausalLM

from checkpoint import load_model
from data import format_prompt
from engine import Engine, QueueFull, Request, generate_ids
from optimize import use_cpu_decoding_layout
from tokenizer import Tokenizer

PROMPTS = [
    "Give three tips for staying healthy.",
    "Hi",
    "Rewrite the following sentence in the passive voice, and explain what changed: The cat chased the mouse.",
    "What is the capital of France?",
    "List four prime numbers.",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return Tokenizer(str(tokenizer_model))


@pytest.fixture(scope="module")
def model(model_dir):
    model = load_model(str(model_dir))
    use_cpu_decoding_layout(model)  # as the command line and the server decode on the CPU
    return model


@pytest.fixture(scope="module")
def solo_model(model_dir):
    """The same model again, to decode alone: an engine owns its model's KV cache, and another would replace it."""
    model = load_model(str(model_dir))
    use_cpu_decoding_layout(model)
    return model


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids = [tokenizer.encode(format_prompt(p), bos=True) for p in PROMPTS]
    ids[1] = tokenizer.encode("Hi", bos=True)  # 3 tokens: shorter than a prefill chunk
    return ids


def alone(model, request: Request, eos_id: int) -> list[int]:
    """The request's answer decoded with nothing beside it (by a model of its own)."""
    settings = dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, seed=None)
    if request.seed is None:
        return generate_ids(model, [request.prompt_ids], request.max_new_tokens, eos_id, **settings)[0]
    engine = Engine(model, eos_id, max_batch_size=1)
    solo = Request(request.prompt_ids, request.max_new_tokens, request.temperature, request.top_p, request.top_k,
                   request.seed)  # fmt: skip
    engine.submit([solo])
    engine.run_until_done()
    return solo.output_ids


def test_requests_joining_and_leaving_mid_decode_answer_as_alone(model, solo_model, tokenizer, prompt_ids):
    """Three rows for five requests: they join at different steps, prefill in chunks of 8 tokens beside the rows
    decoding (the longest prompt takes 6 chunks), leave at EOS, at their max_new_tokens or cancelled, and
    their rows go to the waiting ones. Greedy and seeded sampling mixed: every answer is the one it gets alone."""
    eos = generate_ids(model, [prompt_ids[3]], 40, tokenizer.eos_id)[0][6]  # a token it produces: an early EOS
    engine = Engine(model, eos, max_batch_size=3, prefill_chunk=8)
    requests = [
        Request(prompt_ids[0], 30),
        Request(prompt_ids[1], 12, temperature=0.9, top_p=0.9, seed=5),
        Request(prompt_ids[2], 25),
        Request(prompt_ids[3], 40),  # ends at its "EOS"
        Request(prompt_ids[4], 20, temperature=1.0, top_k=20, seed=7),
    ]
    # A reader that goes away after 5 tokens: its row is freed at the next step, for the last request.
    cancelled = Request(prompt_ids[2], 40)
    cancelled.on_token = lambda token, _: len(cancelled.output_ids) == 5 and cancelled.cancelled.set()
    engine.submit(requests[:2])
    for _ in range(3):
        engine.step()
    engine.submit(requests[2:4] + [cancelled])  # one joins now, the others wait for rows
    seen_batch_sizes = set()
    while True:
        if cancelled.finish_reason == "cancelled" and requests[4].row < 0 and not engine.waiting:
            engine.submit(requests[4:])
        if not (engine.waiting or engine.decoding or engine.prefilling):
            break
        seen_batch_sizes.add(len(engine.decoding))
        engine.step()
    assert seen_batch_sizes >= {1, 2, 3}
    assert cancelled.finish_reason == "cancelled" and len(cancelled.output_ids) == 5
    assert requests[4].output_ids
    assert [r.finish_reason for r in requests] == ["length", "length", "length", "stop", "length"]
    for request in requests:
        assert request.output_ids == alone(solo_model, request, eos)
    assert engine.free_rows == {0, 1, 2} and engine.taken_rows == 0


def test_a_full_queue_refuses_at_once(model, tokenizer, prompt_ids):
    engine = Engine(model, tokenizer.eos_id, max_batch_size=2, max_queue=1)
    engine.submit([Request(prompt_ids[0], 4), Request(prompt_ids[1], 4)])
    engine.submit([Request(prompt_ids[2], 4)])
    with pytest.raises(QueueFull):
        engine.submit([Request(prompt_ids[3], 4)])
    with pytest.raises(QueueFull):  # all or none: two do not fit where one does not
        engine.submit([Request(prompt_ids[3], 4), Request(prompt_ids[4], 4)])
    engine.run_until_done()
    engine.submit([Request(prompt_ids[3], 4), Request(prompt_ids[4], 4), Request(prompt_ids[0], 4)])


class FaultyModel(torch.nn.Module):
    """The model, but a forward raises when its tokens hold `poison`, or, while fail_decoding is set, when it
    decodes a row (a row of one new token)."""

    def __init__(self, model, poison: int):
        super().__init__()
        self.model, self.poison, self.fail_decoding = model, poison, False
        self.model_args, self.embed_tokens, self.layers = model.model_args, model.embed_tokens, model.layers

    def setup_cache(self, rows, slots):
        self.model.setup_cache(rows, slots)

    def forward(self, tokens, *args, tokens_at=None, **kwargs):
        if (tokens == self.poison).any():
            raise RuntimeError("poisoned prompt")
        new_tokens = tokens_at.sum(dim=1) if tokens_at is not None else torch.full((len(tokens),), tokens.shape[1])
        if self.fail_decoding and (new_tokens == 1).any():
            raise RuntimeError("a decoding step failed")
        return self.model(tokens, *args, tokens_at=tokens_at, **kwargs)


def test_a_step_that_raises_fails_only_its_own_rows(model, solo_model, tokenizer, prompt_ids):
    poison = 31999
    faulty = FaultyModel(model, poison)
    engine = Engine(faulty, tokenizer.eos_id, max_batch_size=3, prefill_chunk=8)
    good = Request(prompt_ids[0], 20)
    engine.submit([good])
    for _ in range(3):
        engine.step()
    # Its chunks ride in the decoding row's forwards: the one that raises is done again apart.
    bad = Request(prompt_ids[2][:20] + [poison] + prompt_ids[2][20:], 20)  # fails in its third prefill chunk
    later = Request(prompt_ids[4], 10)
    engine.submit([bad, later])
    engine.run_until_done()
    assert bad.finish_reason == "error" and "poisoned prompt" in bad.error
    assert good.output_ids == alone(solo_model, good, tokenizer.eos_id)
    assert later.output_ids == alone(solo_model, later, tokenizer.eos_id)

    # A decoding step that raises fails the rows it was decoding; the one still prefilling, and the engine, go on.
    decoding = [Request(prompt_ids[1], 20), Request(prompt_ids[3], 20)]
    engine.submit(decoding)
    for _ in range(3):
        engine.step()
    joining = Request(prompt_ids[2], 10)
    engine.submit([joining])
    engine.step()  # its first chunk, beside the decoding rows
    faulty.fail_decoding = True
    while not all(request.finish_reason for request in decoding):
        engine.step()
    faulty.fail_decoding = False
    assert joining.length < len(joining.prompt_ids)  # it was still prefilling
    engine.run_until_done()
    assert [r.finish_reason for r in decoding] == ["error", "error"] and "a decoding step failed" in decoding[0].error
    assert joining.finish_reason == "length" and joining.output_ids == alone(solo_model, joining, tokenizer.eos_id)


def test_a_failing_callback_fails_only_its_request(model, solo_model, tokenizer, prompt_ids):
    engine = Engine(model, tokenizer.eos_id, max_batch_size=2)

    def broken(token, logits):
        raise ValueError("a bug in the caller")

    bad, good = Request(prompt_ids[1], 10, on_token=broken), Request(prompt_ids[0], 10)
    engine.submit([bad, good])
    engine.run_until_done()
    assert bad.finish_reason == "error" and "a bug in the caller" in bad.error
    assert good.output_ids == alone(solo_model, good, tokenizer.eos_id)


def test_logits_handed_out_are_transformers(model_dir, model, tokenizer, prompt_ids):
    """The logits a request asks for (at every prompt position, chunk by chunk, and at each new token) are those
    of transformers' model over the prompt and the answer, even while another request decodes beside it."""
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, tokenizer.eos_id, max_batch_size=2, prefill_chunk=8)
    prompt_logits, step_logits = [], []
    other = Request(prompt_ids[0], 30)
    watched = Request(prompt_ids[2], 12, on_prompt_logits=prompt_logits.append, logits=True,
                      on_token=lambda token, logits: step_logits.append(logits))  # fmt: skip
    engine.submit([other])
    engine.step()
    engine.submit([watched])
    engine.run_until_done()
    tokens = watched.prompt_ids + watched.output_ids
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens])).logits[0]
    n = len(watched.prompt_ids)
    assert len(prompt_logits) > 1  # chunk by chunk
    torch.testing.assert_close(torch.cat(prompt_logits), expected[:n], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(step_logits), expected[n - 1 : -1], atol=1e-4, rtol=0)


def test_cache_cost_per_row(model):
    engine = Engine(model, 2, max_batch_size=2)
    a = model.model_args
    assert engine.cache_bytes_per_row() == 2 * a.n_layers * a.n_kv_heads * a.head_dim * (a.max_seq_len + 1) * 4

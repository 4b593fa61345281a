"""serve.py through the official openai client and plain HTTP: greedy answers against transformers and against
generate.py, streaming, batching of concurrent requests, bad requests, clients that leave, Ctrl-C, and the chat
page in a real headless Chromium."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from browser import Chromium, needs_chromium, post
from transformers import LlamaForCausalLM

import serve
from tokenizer import Tokenizer

MAX_SEQ_LEN = 128
RAW_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):\n    ", "Hi"]
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Rewrite the following sentence in the passive voice: The cat chased the mouse.",
]


@pytest.fixture(scope="module")
def server(model_dir):
    """serve.py in this process, on a free loopback port, as its main() starts it."""
    server = serve.build_server(serve.parse_args(["--model_path", str(model_dir), "--port", "0"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url(server):
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def batches(monkeypatch):
    """Records the prompts of each batch the server decodes; `batches.step_delay` seconds slow every decoding
    step, so that an answer lasts long enough to act on while it streams."""
    recorded = []

    def spy(model, prompt_ids, *args, decode_step=None, **kwargs):
        step = decode_step or model

        def slow_step(*step_args):
            time.sleep(spy.step_delay)
            return step(*step_args)

        answers = serve_generate_ids(model, prompt_ids, *args, decode_step=slow_step, **kwargs)
        recorded.append((prompt_ids, answers))
        return answers

    serve_generate_ids = serve.generate_ids
    spy.step_delay = 0.0
    spy.recorded = recorded
    monkeypatch.setattr(serve, "generate_ids", spy)
    return spy


def complete(client, prompt, **settings):
    settings = {"max_tokens": 24, "temperature": 0} | settings
    return client.completions.create(model="any", prompt=prompt, **settings)


def chat(client, instruction, input=None, **settings):
    messages = [{"role": "user", "content": instruction}] + ([{"role": "user", "content": input}] if input else [])
    settings = {"max_tokens": 24, "temperature": 0} | settings
    return client.chat.completions.create(model="any", messages=messages, **settings)


def test_greedy_completion_matches_transformers(client, model_dir):
    """Raw prompts (BOS prepended, no template), several in one request and so decoded as one left-padded
    batch, against transformers' greedy generate one prompt at a time."""
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer(str(model_dir / "tokenizer.model"))
    response = complete(client, RAW_PROMPTS)
    assert [choice.index for choice in response.choices] == list(range(len(RAW_PROMPTS)))
    for prompt, choice in zip(RAW_PROMPTS, response.choices, strict=True):
        ids = tokenizer.encode(prompt, bos=True)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, pad_token_id=0)
        expected = out[0, len(ids) :].tolist()
        assert len(expected) == 24 and choice.finish_reason == "length"  # no early EOS on either side
        assert choice.text == tokenizer.decode(expected)
    assert response.usage.completion_tokens == 24 * len(RAW_PROMPTS)
    assert response.usage.prompt_tokens == sum(len(tokenizer.encode(p, bos=True)) for p in RAW_PROMPTS)
    assert response.object == "text_completion" and response.model == model_dir.name


def test_chat_equals_generate_command_line(client, model_dir):
    for instruction, input in [(INSTRUCTIONS[0], None), ("Summarize this.", "Cats chase mice, and dogs chase cats.")]:
        command = [sys.executable, "generate.py", "--model_path", str(model_dir), "--temperature", "0"]
        command += ["--max_new_tokens", "24", instruction] + (["--input", input] if input else [])
        done = subprocess.run(command, cwd=serve.CHAT_PAGE.parent, capture_output=True, text=True, check=True)
        response = chat(client, instruction, input)
        message = response.choices[0].message
        assert message.role == "assistant" and message.content + "\n" == done.stdout
        assert response.object == "chat.completion" and response.usage.completion_tokens == 24


def test_streamed_equals_non_streamed(client):
    expected = complete(client, RAW_PROMPTS[0], max_tokens=32)
    chunks = list(complete(client, RAW_PROMPTS[0], max_tokens=32, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 10  # token by token, not in one piece
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage == expected.usage and not chunks[-1].choices

    expected = chat(client, INSTRUCTIONS[1], max_tokens=32)
    chunks = list(chat(client, INSTRUCTIONS[1], max_tokens=32, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_stop_strings_and_max_tokens_capped_by_the_context(client):
    full = complete(client, RAW_PROMPTS[0], max_tokens=32).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle of the answer
    cut = complete(client, RAW_PROMPTS[0], max_tokens=32, stop=["never appears", stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    streamed = complete(client, RAW_PROMPTS[0], max_tokens=32, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text  # never a part of the stop string shown

    response = complete(client, RAW_PROMPTS[3], max_tokens=100_000)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens + response.usage.completion_tokens == MAX_SEQ_LEN


def test_concurrent_requests_are_batched_and_answer_as_alone(client, batches):
    """Six streams at once, greedy and seeded sampling mixed, each with its own settings: every answer is the
    one the same request got alone, and they were decoded together."""
    requests = [
        dict(prompt=RAW_PROMPTS[0], max_tokens=20),
        dict(prompt=RAW_PROMPTS[1], max_tokens=30, temperature=0.8, top_p=0.9, seed=1),
        dict(prompt=RAW_PROMPTS[2], max_tokens=12),
        dict(prompt=RAW_PROMPTS[3], max_tokens=25, temperature=1.0, seed=2),
        dict(prompt=INSTRUCTIONS[0], max_tokens=18, stop="\n"),
        dict(prompt=INSTRUCTIONS[2], max_tokens=28, temperature=0.5, top_p=0.5, seed=3),
    ]
    alone = [complete(client, **request).choices[0].text for request in requests]
    assert max(len(prompt_ids) for prompt_ids, _ in batches.recorded) == 1
    # Slower steps: requests that miss the first batch on a busy machine are all waiting when the next one starts.
    batches.step_delay = 0.01
    start = threading.Barrier(len(requests))

    def stream(request):
        start.wait()
        return "".join(c.choices[0].text for c in complete(client, stream=True, **request))

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(stream, requests))
    assert together == alone
    assert max(len(prompt_ids) for prompt_ids, _ in batches.recorded) >= 3
    assert alone[1] != complete(client, **(requests[1] | {"seed": 7})).choices[0].text  # the seed does matter


GOOD = {"prompt": "Hi", "max_tokens": 4}
BAD_REQUESTS = [
    ("POST", "/v1/completions", b'{"prompt": "Hi",', 400, "not valid JSON"),
    ("POST", "/v1/completions", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "'prompt' must be a string"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "'prompt' must be a string"),
    ("POST", "/v1/completions", GOOD | {"max_tokens": -1}, 400, "'max_tokens' must be an integer >= 1, got -1"),
    ("POST", "/v1/completions", GOOD | {"max_tokens": "10"}, 400, "'max_tokens' must be an integer"),
    ("POST", "/v1/completions", GOOD | {"max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ("POST", "/v1/completions", GOOD | {"temperature": "hot"}, 400, "'temperature' must be a number"),
    ("POST", "/v1/completions", GOOD | {"temperature": 3}, 400, "'temperature' must be a number in [0, 2]"),
    ("POST", "/v1/completions", GOOD | {"top_p": 0}, 400, "'top_p' must be a number in (0, 1]"),
    ("POST", "/v1/completions", GOOD | {"seed": 1.5}, 400, "'seed' must be an integer"),
    ("POST", "/v1/completions", GOOD | {"seed": 2**64}, 400, "'seed' must be an integer in [0, 2**64)"),
    ("POST", "/v1/completions", GOOD | {"stop": [1]}, 400, "'stop' must be a string or a list"),
    ("POST", "/v1/completions", GOOD | {"stream": "yes"}, 400, "'stream' must be true or false"),
    ("POST", "/v1/completions", GOOD | {"n": 2}, 400, "'n' must be 1"),
    ("POST", "/v1/completions", GOOD | {"suffix": "!"}, 400, "'suffix' is not supported"),
    ("POST", "/v1/completions", {"prompt": "word " * MAX_SEQ_LEN}, 400, "the model's context is 128 tokens"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "'messages' must be a non-empty list"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "'messages'[0]: 'content' must be"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "must be the user's"),
    ("GET", "/nowhere", None, 404, "no route /nowhere"),
    ("POST", "/nowhere", GOOD, 404, "no route /nowhere"),
    ("GET", "/v1/completions", None, 405, "/v1/completions takes POST, not GET"),
    ("DELETE", "/v1/models", None, 405, "/v1/models takes GET, not DELETE"),
]


@pytest.mark.parametrize("method, path, body, status, message", BAD_REQUESTS)
def test_bad_request_gets_its_4xx_and_the_server_goes_on(url, client, method, path, body, status, message):
    got_status, answer = post(url, path, body, method)
    assert got_status == status
    assert message in answer["error"]["message"] and isinstance(answer["error"]["type"], str)
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4


def raw_exchange(url, request: bytes) -> bytes:
    with socket.create_connection(url.removeprefix("http://").split(":"), timeout=30) as connection:
        connection.sendall(request)
        return connection.makefile("rb").read()


def test_a_body_over_the_limit_is_refused_unread(url, client):
    too_long = {"Content-Length": str(serve.MAX_BODY_BYTES + 1)}
    status, answer = post(url, "/v1/completions", b"{}", headers=too_long)
    assert status == 413 and "the limit is" in answer["error"]["message"]
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4


def test_malformed_http_gets_json_errors(url, client):
    # A request line that is not HTTP/1.x is answered the HTTP/0.9 way: the body alone.
    assert "Bad request syntax" in json.loads(raw_exchange(url, b"GARBAGE\r\n\r\n"))["error"]["message"]
    long_header = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n"
    no_length = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for request, status in [(long_header, 431), (no_length, 411)]:
        head, _, body = raw_exchange(url, request).partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and json.loads(body)["error"]["message"]
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4


def test_a_client_that_leaves_frees_its_row_and_others_go_on(url, client, batches):
    batches.step_delay = 0.02  # 100 tokens take 2 s: the first client leaves well before its answer ends
    expected = complete(client, RAW_PROMPTS[1], max_tokens=40).choices[0].text
    start = threading.Barrier(2)

    def leave_after_three_chunks():
        start.wait()
        body = json.dumps({"prompt": RAW_PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        with socket.create_connection(url.removeprefix("http://").split(":"), timeout=30) as connection:
            connection.sendall(head + body)
            with connection.makefile("rb") as reader:
                events = 0
                while events < 3:
                    events += reader.readline().startswith(b"data: ")

    def stay():
        start.wait()
        return "".join(c.choices[0].text for c in complete(client, RAW_PROMPTS[1], max_tokens=40, stream=True))

    with ThreadPoolExecutor(2) as pool:
        leaving, staying = pool.submit(leave_after_three_chunks), pool.submit(stay)
        leaving.result()
        assert staying.result() == expected
    left_row = [answers[0] for prompt_ids, answers in batches.recorded if len(prompt_ids) == 2]
    assert left_row and len(left_row[0]) < 50  # its row was finished soon after it left, not decoded to the end


def test_timeout_cuts_the_answer(server, client, batches, monkeypatch):
    batches.step_delay = 0.02
    monkeypatch.setattr(server, "request_timeout", 0.3)
    response = complete(client, "Hi", max_tokens=100)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens < 50


def test_models_health_and_page(url, client, model_dir):
    assert [m.id for m in client.models.list()] == [model_dir.name]
    assert post(url, "/health", None, "GET") == (200, {"status": "ok"})
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.request("GET", "/")
    page = connection.getresponse().read().decode()
    assert "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page  # self-contained, no CDN


def start_serve_process(model_dir, *flags):
    command = [sys.executable, "serve.py", "--model_path", str(model_dir), "--port", "0", *flags]
    return subprocess.Popen(command, cwd=serve.CHAT_PAGE.parent, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_stops_cleanly_mid_answer(model_dir):
    process = start_serve_process(model_dir)
    try:
        line = process.stderr.readline()
        assert line.startswith(f"serving {model_dir.name} on http://127.0.0.1:"), line
        port = int(line.split(":")[2].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = complete(client, "Hi", max_tokens=100, stream=True)
        next(iter(stream))  # an answer is being decoded
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_bad_flags_are_one_line(model_dir):
    for flags, message in [(["--max_batch_size", "0"], "--max_batch_size must be >= 1, got 0"),
                           (["--timeout", "0"], "--timeout must be > 0, got 0.0")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            serve.main(["--model_path", str(model_dir), *flags])
        assert exit_info.value.code == f"error: {message}"


def test_a_port_in_use_is_one_line(model_dir):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "serve.py", "--model_path", str(model_dir), "--port", str(port)],
            cwd=serve.CHAT_PAGE.parent, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1 and done.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# ---------------------------------------------------------------------------------------------------------
# The chat page in a real browser


@needs_chromium
def test_chat_page_in_a_real_browser(url, client, batches, tmp_path):
    """Opens the page, types an instruction and an input, presses Send and sees the answer stream in: the same
    answer the API gives. The screenshot is left in the test's temporary directory. Then Stop, mid-answer."""
    instruction, input = "Summarize this.", "Cats chase mice."
    expected = chat(client, instruction, input, max_tokens=40).choices[0].message.content
    batches.step_delay = 0.02  # 40 tokens over about a second, so the page has something to show as it comes
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(url + "/")
        browser.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent !== ''")
        browser.evaluate("document.getElementById('temperature').value = '0'")
        browser.evaluate("document.getElementById('max_tokens').value = '40'")
        browser.click("#instruction")
        browser.call("Input.insertText", text=instruction)
        browser.click("#input")
        browser.call("Input.insertText", text=input)
        # Counts the changes to the conversation, to see the answer arrive in pieces.
        browser.evaluate(
            "window.changes = 0; new MutationObserver(() => window.changes++)"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})"
        )
        browser.click("#send")
        browser.wait_for("document.getElementById('stop').disabled === false")
        browser.wait_for("document.getElementById('send').disabled === false")
        answer = browser.evaluate("document.querySelector('.answer').textContent")
        shown = browser.evaluate("document.querySelector('.instruction').textContent")
        browser.screenshot(tmp_path / "chat.png")
        assert answer == expected
        assert shown == instruction + input
        assert browser.evaluate("window.changes") > 10
        assert "40 tokens" in browser.evaluate("document.querySelector('.note').textContent")

        # Stop, mid-answer: the page keeps what came, and the server finishes that row early.
        browser.evaluate("document.getElementById('max_tokens').value = '100'")
        browser.click("#instruction")
        browser.call("Input.insertText", text=INSTRUCTIONS[0])
        browser.click("#send")
        browser.wait_for("document.querySelectorAll('.answer')[1]?.textContent.length > 0")
        browser.click("#stop")
        browser.wait_for("document.getElementById('send').disabled === false")
        assert browser.evaluate("document.querySelectorAll('.note')[1].textContent") == "stopped"
        stopped = browser.evaluate("document.querySelectorAll('.answer')[1].textContent")
        assert chat(client, INSTRUCTIONS[0], max_tokens=100).choices[0].message.content.startswith(stopped)
        assert len(batches.recorded[-2][1][0]) < 60  # the stopped row, before the reference request above
    finally:
        browser.close()

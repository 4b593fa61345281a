"""serve.py through the official openai client and plain HTTP: greedy answers against transformers and against
generate.py, streaming, requests that join and leave the running batch, bad requests, the API key, a full queue,
clients that leave, Ctrl-C, and the chat page in a real headless Chromium."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch
from browser import Chromium, needs_chromium, post
from transformers import LlamaForCausalLM

import serve
from tokenizer import Tokenizer

MAX_SEQ_LEN = 128
API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
RAW_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):\n    ", "Hi"]
INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Rewrite the following sentence in the passive voice: The cat chased the mouse.",
]


def start_server(model_dir, *flags):
    """serve.py in this process, on a free loopback port, as its main() starts it."""
    server = serve.build_server(serve.parse_args(["--model_path", str(model_dir), "--port", "0", *flags]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(model_dir):
    server = start_server(model_dir, "--api_key", API_KEY)
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
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def spy_on(engine, monkeypatch) -> SimpleNamespace:
    """Records the batch size of each decoding step of the server's engine, and each request as it ends;
    `step_delay` seconds slow every step, so that an answer lasts long enough to act on while it streams."""
    spy = SimpleNamespace(step_delay=0.0, batch_sizes=[], ended=[])
    decode, leave = engine.decode, engine.leave

    def slow_decode():
        time.sleep(spy.step_delay)
        spy.batch_sizes.append(len(engine.decoding))
        decode()

    def recording_leave(request):
        spy.ended.append(request)
        leave(request)

    monkeypatch.setattr(engine, "decode", slow_decode)
    monkeypatch.setattr(engine, "leave", recording_leave)
    return spy


@pytest.fixture
def engine(server, monkeypatch):
    return spy_on(server.engine, monkeypatch)


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


def test_concurrent_requests_are_batched_and_answer_as_alone(client, engine):
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
    assert max(engine.batch_sizes) == 1
    engine.step_delay = 0.01  # they join the running batch at its next step even on a busy machine
    start = threading.Barrier(len(requests))

    def stream(request):
        start.wait()
        return "".join(c.choices[0].text for c in complete(client, stream=True, **request))

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(stream, requests))
    assert together == alone
    assert max(engine.batch_sizes) >= 3
    assert alone[1] != complete(client, **(requests[1] | {"seed": 7})).choices[0].text  # the seed does matter


def test_a_short_request_joins_a_long_answer_and_ends_first(server, client, engine):
    """A short request sent while a long answer streams joins the running batch at the next step and ends while
    the long one goes on: it does not wait for it. Both answer as they do alone."""
    long_alone = complete(client, INSTRUCTIONS[0], max_tokens=100).choices[0].text
    short_alone = complete(client, RAW_PROMPTS[2], max_tokens=5).choices[0].text
    engine.step_delay = 0.02  # 100 tokens take 2 s or more
    while server.engine.decoding:  # the answers above have been sent; their rows leave right after
        time.sleep(0.01)
    ended_before = len(engine.ended)
    long_stream = iter(complete(client, INSTRUCTIONS[0], max_tokens=100, stream=True))
    long_text = "".join(next(long_stream).choices[0].text for _ in range(3))  # the long answer is decoding
    assert complete(client, RAW_PROMPTS[2], max_tokens=5).choices[0].text == short_alone
    assert [len(request.output_ids) for request in engine.ended[ended_before:]] == [5]  # the long one goes on
    long_text += "".join(chunk.choices[0].text for chunk in long_stream)
    assert long_text == long_alone
    assert max(engine.batch_sizes) == 2


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
    got_status, answer = post(url, path, body, method, headers=AUTH)
    assert got_status == status
    assert message in answer["error"]["message"] and isinstance(answer["error"]["type"], str)
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4


def raw_exchange(url, request: bytes) -> bytes:
    with socket.create_connection(url.removeprefix("http://").split(":"), timeout=30) as connection:
        connection.sendall(request)
        return connection.makefile("rb").read()


def test_a_body_over_the_limit_is_refused_unread(url, client):
    too_long = {"Content-Length": str(serve.MAX_BODY_BYTES + 1)}
    status, answer = post(url, "/v1/completions", b"{}", headers=too_long | AUTH)
    assert status == 413 and "the limit is" in answer["error"]["message"]
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4


def test_malformed_http_gets_json_errors(url, client):
    # A request line that is not HTTP/1.x is answered the HTTP/0.9 way: the body alone.
    assert "Bad request syntax" in json.loads(raw_exchange(url, b"GARBAGE\r\n\r\n"))["error"]["message"]
    long_header = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n"
    no_length = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    no_length = (no_length + "Transfer-Encoding: chunked\r\n\r\n").encode()
    for request, status in [(long_header, 431), (no_length, 411)]:
        head, _, body = raw_exchange(url, request).partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and json.loads(body)["error"]["message"]
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4


def test_a_client_that_leaves_frees_its_row_and_others_go_on(url, client, engine):
    engine.step_delay = 0.02  # 100 tokens take 2 s: the first client leaves well before its answer ends
    expected = complete(client, RAW_PROMPTS[1], max_tokens=40).choices[0].text
    start = threading.Barrier(2)

    def leave_after_three_chunks():
        start.wait()
        body = json.dumps({"prompt": RAW_PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        head = (head + f"Content-Length: {len(body)}\r\n\r\n").encode()
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
    (left,) = [request for request in engine.ended if request.finish_reason == "cancelled"]
    assert len(left.output_ids) < 50  # its row was freed soon after it left, not decoded to the end


def test_timeout_cuts_the_answer(server, client, engine, monkeypatch):
    engine.step_delay = 0.02
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


def test_v1_needs_the_api_key(url, model_dir):
    """/v1/* answers 401 in OpenAI's shape without the key, or with another; the page and /health need none."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as error:
        complete(client, "Hi", max_tokens=4)
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    status, answer = post(url, "/v1/models", None, "GET")  # no key at all
    assert status == 401 and answer["error"]["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in answer["error"]["message"]
    assert post(url, "/health", None, "GET") == (200, {"status": "ok"})
    assert post(url, "/v1/models", None, "GET", headers=AUTH)[1]["data"][0]["id"] == model_dir.name


@pytest.fixture
def busy_server(model_dir, monkeypatch):
    """A server of one row and a queue of one, whose steps take 20 ms."""
    server = start_server(model_dir, "--max_batch_size", "1", "--max_queue", "1")
    spy = spy_on(server.engine, monkeypatch)
    spy.step_delay = 0.02
    yield server, spy, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_past_the_queue_429_at_once_with_retry_after(busy_server):
    server, spy, url = busy_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    running = iter(complete(client, "Hi", max_tokens=60, stream=True))
    next(running)  # decoding in the one row
    waiting = ThreadPoolExecutor(1).submit(complete, client, "Hi", max_tokens=4)
    while not server.engine.waiting:  # in the queue
        time.sleep(0.01)
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 4}))
    response = connection.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 429 and response.getheader("Retry-After") == "1"
    assert error["code"] == "rate_limit_exceeded" and "retry after 1 s" in error["message"]
    with pytest.raises(openai.RateLimitError):
        complete(client, "Hi", max_tokens=4)
    assert sum(len(chunk.choices[0].text) > 0 for chunk in running) > 10  # the running answer went on
    assert waiting.result().usage.completion_tokens == 4  # and the queued one was answered
    assert complete(client, "Hi", max_tokens=4).usage.completion_tokens == 4  # room again


def test_many_clients_at_once_each_get_an_answer_or_a_429(busy_server):
    """60 connections at once, none reset: each gets its answer or a 429 (1 row, 1 waiting)."""
    _, _, url = busy_server
    start = threading.Barrier(60)

    def ask(_):
        start.wait()
        status, answer = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        return status

    with ThreadPoolExecutor(60) as pool:
        statuses = list(pool.map(ask, range(60)))
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2
    assert post(url, "/health", None, "GET") == (200, {"status": "ok"})


def test_compile_builds_in_the_background_while_requests_are_answered(model_dir, tmp_path, monkeypatch):
    """--compile: the first answer comes at once, uncompiled, while a process of its own compiles the step; then
    the engine switches to it, and the answers stay the same."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    server = start_server(model_dir, "--compile", "--max_batch_size", "1")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
        uncompiled = complete(client, RAW_PROMPTS[0], max_tokens=30).choices[0].text
        assert server.engine.compiled.get(1) is None  # still compiling, and nobody waited for it
        deadline = time.monotonic() + 900
        while server.engine.compiled.get(1) is None:
            assert time.monotonic() < deadline, "the compiled step never came"
            time.sleep(0.5)
        steps = []
        get = server.engine.compiled.get
        monkeypatch.setattr(
            server.engine.compiled, "get", lambda batch_size: steps.append(get(batch_size)) or get(batch_size)
        )
        assert complete(client, RAW_PROMPTS[0], max_tokens=30).choices[0].text == uncompiled
        assert len(steps) == 29 and all(step is not None for step in steps)
    finally:
        server.shutdown()
        server.server_close()


def test_a_host_beyond_this_machine_is_told_apart():
    assert all(serve.is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(serve.is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"))


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
                           (["--max_queue", "-1"], "--max_queue must be >= 0, got -1"),
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
def test_chat_page_in_a_real_browser(url, client, engine, tmp_path):
    """Opens the page, which asks for the API key once, types an instruction and an input, presses Send and sees
    the answer stream in: the same answer the API gives. The screenshot is left in the test's temporary directory.
    Then Stop, mid-answer."""
    instruction, input = "Summarize this.", "Cats chase mice."
    expected = chat(client, instruction, input, max_tokens=40).choices[0].message.content
    engine.step_delay = 0.02  # 40 tokens over about a second, so the page has something to show as it comes
    browser = Chromium(tmp_path / "profile")
    model_shown = "document.readyState === 'complete' && document.getElementById('model').textContent !== ''"
    try:
        browser.open(url + "/")
        browser.wait_for("document.getElementById('keyform')?.hidden === false")  # /v1/models said 401
        browser.click("#api_key")
        browser.call("Input.insertText", text=API_KEY)
        browser.click("#save_key")
        browser.wait_for(model_shown)
        browser.evaluate("window.before_reload = true")
        browser.call("Page.reload")  # the key is kept: asked once
        browser.wait_for(f"!window.before_reload && {model_shown}")
        assert browser.evaluate("document.getElementById('keyform').hidden") is True
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
        (stopped_row,) = [request for request in engine.ended if request.finish_reason == "cancelled"]
        assert len(stopped_row.output_ids) < 60  # freed at the next step, not decoded to the end
    finally:
        browser.close()

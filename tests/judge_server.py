"""A local, deterministic stand-in for an OpenAI judge, for the evaluation tests and bench: it answers AlpacaEval's
judge prompt with one token and its top-5 logprobs. Each output's quality comes from a hash of its text, and the
output shown first gets a bonus: a position bias, which only the seeded swap cancels out on average. It records
every request body it is sent."""

import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUTPUT = re.compile(r'"output": """(.*?)"""\n    \}', re.DOTALL)
OTHER_TOKENS = {"Both": -1.0, "The": -2.0, "Based": -3.0}
UNPARSEABLE = "[the judge cannot parse this]"  # an instruction holding it gets an answer without m or M


def quality(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF * 4


def judge_answer(messages: list[dict], first_bonus: float) -> dict:
    """The chat completion's choice for a judge prompt: logits for m (the first output) and M (the second)."""
    user = messages[-1]["content"]
    first, second = OUTPUT.findall(user)
    logits = {"m": quality(first) + first_bonus, "M": quality(second), **OTHER_TOKENS}
    if UNPARSEABLE in user:
        logits = {"I": 3.0, "Both": 2.0, "Output": 1.0, "The": 0.5, "Based": 0.0}
    log_total = math.log(sum(math.exp(v) for v in logits.values()) + 1.0)  # 1.0: the rest of the vocabulary
    top = sorted(logits.items(), key=lambda kv: -kv[1])[:5]
    entries = [{"token": t, "logprob": v - log_total, "bytes": list(t.encode())} for t, v in top]
    return {
        "index": 0,
        "message": {"role": "assistant", "content": top[0][0]},
        "logprobs": {"content": [entries[0] | {"top_logprobs": entries}]},
        "finish_reason": "length",
    }


class JudgeServer(ThreadingHTTPServer):
    """serve_forever() in a thread; `requests` holds every body received and `times` when it came. `fail_first`
    answers its first N requests with 429 (with Retry-After: `retry_after` seconds) or 500, alternating;
    `on_request(n)`, if set, is called as the n-th request comes in, before it is answered."""

    daemon_threads = True

    def __init__(self, latency: float = 0.0, first_bonus: float = 1.0, fail_first: int = 0, retry_after: str = "0"):
        self.latency, self.first_bonus, self.fail_first, self.retry_after = (
            latency,
            first_bonus,
            fail_first,
            retry_after,
        )
        self.on_request = None
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
            self.server.times.append(time.monotonic())
            n = len(self.server.requests)
        if self.server.on_request is not None:
            self.server.on_request(n)
        time.sleep(self.server.latency)
        if n <= self.server.fail_first:
            status = 429 if n % 2 else 500
            self.reply(
                status,
                {"error": {"message": "try again", "type": "rate_limit"}},
                {"Retry-After": self.server.retry_after} if status == 429 else {},
            )
            return
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
        self.reply(
            200,
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [judge_answer(body["messages"], self.server.first_bonus)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
            },
        )

    def reply(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass

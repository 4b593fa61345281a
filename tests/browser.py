"""What the page tests share: requests made with the standard library, and a headless Chromium driven over the
DevTools protocol (Debian's chromium, which .ci/run installs; the tests that need it skip without it)."""

import base64
import fcntl
import http.client
import json
import os
import select
import shutil
import subprocess
import time

import pytest

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)"
)


def post(url, path, body, method="POST", headers=None):
    """(status, decoded JSON) of a request made with the standard library, body as given (bytes: sent as is)."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"} | (headers or {}))
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def pipe_above_fd_4() -> tuple[int, int]:
    """A pipe whose ends are not fds 3 or 4, which the redirections to the browser's fds 3 and 4 would clobber."""
    ends = os.pipe()
    high_ends = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in ends)
    for fd in ends:
        os.close(fd)
    return high_ends


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: the browser reads
    NUL-terminated JSON commands on its fd 3 and writes replies and events on its fd 4), standard library only."""

    def __init__(self, profile_dir):
        command_read, self.command_write = pipe_above_fd_4()
        self.reply_read, reply_write = pipe_above_fd_4()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--window-size=900,700"]
        command = [shutil.which("chromium"), *flags, f"--user-data-dir={profile_dir}", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{command_read} 4>&{reply_write}', "bash", *command],
            pass_fds=(command_read, reply_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(command_read)
        os.close(reply_write)
        self.buffer, self.last_id, self.session = b"", 0, None

    def open(self, url):
        """A new tab, which the later calls drive, on url."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.navigate", url=url)

    def call(self, method, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.command_write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                readable, _, _ = select.select([self.reply_read], [], [], 30)
                assert readable, f"Chromium did not answer {method}"
                data = os.read(self.reply_read, 1 << 20)
                assert data, f"Chromium exited (status {self.process.poll()}) instead of answering {method}"
                self.buffer += data
            reply, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(reply)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression, seconds=30):
        deadline = time.monotonic() + seconds
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)

    def click(self, selector):
        box = self.evaluate(f"JSON.stringify(document.querySelector('{selector}').getBoundingClientRect())")
        box = json.loads(box)
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press(self, key, code, key_code):
        """A key pressed and released, as the page's keydown listeners see it (key "1", code "Digit1", 49)."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code)

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.process.kill()
        self.process.wait()
        os.close(self.command_write)
        os.close(self.reply_read)

"""POSTs to an OpenAI-compatible endpoint with the standard library's HTTP client, and how to retry them: what
self_instruct.py and evaluate.py share."""

import email.utils
import json
import math
import urllib.error
import urllib.request


def post_json(url: str, body: dict, api_key: str | None, timeout: float) -> tuple[int | None, bytes, str | None]:
    """(HTTP status, response body, Retry-After header) of one POST; status None when the endpoint did not answer
    in time or dropped the connection, which is worth another try."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), None
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Retry-After")
    except (TimeoutError, ConnectionResetError) as e:  # a slow or restarting server
        return None, str(e).encode(), None
    except urllib.error.URLError as e:
        if not isinstance(e.reason, TimeoutError):
            raise ValueError(f"{url}: cannot reach the endpoint ({e.reason})") from None
        return None, b"timed out", None


def is_worth_retrying(status: int | None) -> bool:
    """No answer in time, a rate limit or a server error: the same request may go through later."""
    return status is None or status == 429 or status >= 500


def retry_pause(tries: int, retry_after: str | None, now: float, first_delay: float) -> float:
    """Seconds to wait before try number tries + 1: what a Retry-After header asks for, else first_delay doubling
    with each try, up to a minute."""
    asked = retry_after_seconds(retry_after, now)
    return min(60.0, first_delay * 2 ** (tries - 1)) if asked is None else asked


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """The pause a Retry-After header asks for: seconds, or an HTTP date (now is time.time())."""
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None  # unreadable: the usual growing pause


def error_message(body: bytes) -> str:
    """The message of OpenAI's error JSON, or the start of whatever else came back."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200]

"""The chat-completions judge against a real HTTP server on 127.0.0.1 (loopback only).

The server decides what to do from the completion text it finds in the request (so parallel
requests can behave differently) and from a per-completion script of responses consumed in
order: valid verdicts, 429 with Retry-After, 500, malformed answers, and delays past the
client's timeout. It counts requests and the most requests in flight at once.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grao.judges import DEFAULT_TEMPLATE, ChatCompletionsJudge, JudgeError, parse_verdict
from grao.rewards import call_reward

KEY_ENV = "GRAO_TEST_JUDGE_KEY"
SECRET = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK"
RESPONSE_1 = re.compile(r"\[Response 1\]\n(.*?)\n\n\[Response 2\]\n(.*?)\n\n", re.S)


class FakeChatServer:
    """OpenAI-style POST /v1/chat/completions on 127.0.0.1:<free port>.

    Default answer from the completion's first word: "good" -> "1 > 2", "bad" -> "1 < 2",
    "same" -> "1 = 2", "slow:<s>" -> sleeps s then "1 > 2". ``script[completion]`` is a list of
    actions used first, one per request: ("ok", text), ("status", code, headers), ("raw", body),
    ("sleep", seconds) (then the default answer), ("echo_auth", code) (body quotes the auth header).
    """

    def __init__(self):
        self.script: dict[str, list] = {}
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.times: dict[str, list[float]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _send(handler, code, body, headers=None):
        data = body.encode() if isinstance(body, str) else body
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def completion(text):
        return json.dumps({"id": "x", "object": "chat.completion",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": "stop"}]})

    def handle(self, handler):
        length = int(handler.headers.get("Content-Length", 0))
        body = json.loads(handler.rfile.read(length))
        user = body["messages"][-1]["content"]
        resp1, resp2 = RESPONSE_1.search(user).groups()
        with self.lock:
            self.requests.append({"path": handler.path, "body": body, "auth": handler.headers.get("Authorization"),
                                  "response1": resp1, "response2": resp2})
            self.times.setdefault(resp1, []).append(time.monotonic())
            queue = self.script.get(resp1, [])
            action = queue.pop(0) if queue else None
        if handler.path != "/v1/chat/completions":
            return self._send(handler, 404, json.dumps({"error": {"message": f"no route {handler.path}"}}))
        if action is not None:
            kind = action[0]
            if kind == "ok":
                return self._send(handler, 200, self.completion(action[1]))
            if kind == "status":
                headers = action[2] if len(action) > 2 else {}
                return self._send(handler, action[1], json.dumps({"error": {"message": "try later"}}), headers)
            if kind == "raw":
                return self._send(handler, 200, action[1])
            if kind == "echo_auth":
                msg = f"Incorrect API key provided: {handler.headers.get('Authorization')}"
                return self._send(handler, action[1], json.dumps({"error": {"message": msg}}))
            if kind == "sleep":
                time.sleep(action[1])
        word = resp1.split()[0] if resp1.split() else ""
        if word.startswith("slow:"):
            time.sleep(float(word.split(":")[1]))
        verdict = {"good": "1 > 2", "bad": "1 < 2", "same": "1 = 2"}.get(word, "1 > 2")
        return self._send(handler, 200, self.completion(f"Verdict: {verdict}"))


@pytest.fixture
def server():
    srv = FakeChatServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_judge(server, **kw):
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.5)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("api_key_env", KEY_ENV)
    return ChatCompletionsJudge("judge-model", base_url=server.url, trust_env=False, **kw)


def record_sleeps(judge):
    slept = []
    real = judge._sleep

    def sleep(seconds):
        slept.append(seconds)
        real(seconds)

    judge._sleep = sleep
    return slept


# ----------------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize("text, expected", [
    ("1 > 2", 1), ("1 = 2", 0), ("1 < 2", -1), ("1>2", 1), ("  1 <2\n", -1),
    ("Verdict: 1 > 2", 1), ("**1 = 2**", 0), ("`1 < 2`", -1), ('"1 > 2"', 1), ("2 < 1", 1), ("2 > 1", -1),
    ("2 = 1", 0), ("1 >= 2", 1), ("1 ≤ 2", -1), ("1 == 2", 0),
    ("Response 1 is more accurate, so 1 > 2. Final verdict: 1 > 2", 1),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text", ["", "Response 1 is better", "1 > 3", "11 > 2", "1.5 > 2", "1 > 2 or 1 < 2",
                                  "1 = 1", "I cannot decide"])
def test_parse_verdict_rejects(text):
    with pytest.raises(ValueError, match="verdict"):
        parse_verdict(text)


# ----------------------------------------------------------------------------------------------- calls


def test_verdicts_request_format_and_reference_is_free(server):
    judge = make_judge(server)
    prompts = ["q1"] * 4 + ["q2"] * 2
    completions = ["good answer", "bad answer", "same answer", "the ref", "good answer", "the other ref"]
    references = ["the ref"] * 4 + ["the other ref"] * 2
    out = judge(prompts=prompts, completions=completions, references=references)
    assert out == [1.0, -1.0, 0.0, 0.0, 1.0, 0.0]
    # R(y, y) = 0 without a request; 4 distinct non-identical pairs -> 4 requests
    assert len(server.requests) == 4
    stats = judge.stats()
    assert stats["requests"] == 4 and stats["skipped_identical"] == 2 and stats["verdicts"] == 4
    req = next(r for r in server.requests if r["response1"] == "bad answer")
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == f"Bearer {SECRET}"  # the key does reach the server it is meant for
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    assert req["response2"] == "the ref"  # Response 1 = the completion, Response 2 = the reference
    assert "q1" in req["body"]["messages"][-1]["content"]
    assert req["body"]["messages"][0]["role"] == "system"


def test_trl_style_call_and_conversational_inputs(server):
    judge = make_judge(server)
    prompt = [{"role": "user", "content": "what is 2+2?"}]
    completions = [[{"role": "assistant", "content": "good 4"}], [{"role": "assistant", "content": "bad 5"}]]
    # TRL passes the dataset's reference column as solution=..., plus other columns
    out = judge(prompts=[prompt, prompt], completions=completions, solution=["4", "4"], difficulty=[1, 2])
    assert out == [1.0, -1.0]
    assert {r["response1"] for r in server.requests} == {"good 4", "bad 5"}
    # and through grao's own reward plumbing (references and solution both passed)
    vals = call_reward(judge, prompts=["q", "q"], completions=["bad x", "4"], references=["4", "4"])
    assert vals == [-1.0, 0.0]


def test_input_errors(server):
    judge = make_judge(server)
    with pytest.raises(JudgeError, match="references"):
        judge(prompts=["q"], completions=["a"])
    with pytest.raises(JudgeError, match="one entry per completion; got 1, 2 and 2"):
        judge(prompts=["q"], completions=["a", "b"], references=["r", "r"])
    with pytest.raises(JudgeError, match=r"missing \{reference\}"):
        make_judge(server, template="{prompt} {completion}")
    with pytest.raises(JudgeError, match="valid str.format"):
        make_judge(server, template="{prompt} {completion} {reference} {oops")
    with pytest.raises(JudgeError, match="base_url must be an http"):
        ChatCompletionsJudge("m", base_url="ftp://example.invalid", api_key_env=None)
    with pytest.raises(JudgeError, match="max_concurrency must be an integer >= 1"):
        make_judge(server, max_concurrency=0)
    with pytest.raises(JudgeError, match=r"fallback must be None or a number in \[-1, 1\]"):
        make_judge(server, fallback=2)
    assert server.requests == []


def test_missing_key_variable_named(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=rf"\${KEY_ENV} is not set"):
        make_judge(server)
    judge = make_judge(server, api_key_env=None)  # a local server without authentication
    assert judge(prompts=["q"], completions=["good"], references=["r"]) == [1.0]
    assert server.requests[0]["auth"] is None


# ---------------------------------------------------------------------------------------- retries


def test_429_retry_after_is_honoured(server):
    server.script["good a"] = [("status", 429, {"Retry-After": "0.2"})]
    judge = make_judge(server, backoff_base=0.001)
    slept = record_sleeps(judge)
    assert judge(prompts=["q"], completions=["good a"], references=["r"]) == [1.0]
    assert slept == [pytest.approx(0.2)]
    t = server.times["good a"]
    assert len(t) == 2 and t[1] - t[0] >= 0.19
    assert judge.stats()["retries"] == 1


def test_500_exponential_backoff_with_jitter(server):
    server.script["bad b"] = [("status", 500), ("status", 502), ("status", 503)]
    judge = make_judge(server, backoff_base=0.02, jitter=0.5, max_retries=3)
    slept = record_sleeps(judge)
    assert judge(prompts=["q"], completions=["bad b"], references=["r"]) == [-1.0]
    assert len(slept) == 3
    for k, s in enumerate(slept):
        assert 0.02 * 2 ** k <= s <= 0.02 * 2 ** k * 1.5
    t = server.times["bad b"]
    assert len(t) == 4 and all(b - a >= 0.02 * 2 ** k * 0.95 for k, (a, b) in enumerate(zip(t, t[1:], strict=False)))


def test_backoff_is_capped(server):
    server.script["good c"] = [("status", 503, {"Retry-After": "3600"}), ("status", 500)]
    judge = make_judge(server, backoff_base=10.0, backoff_max=0.05)
    slept = record_sleeps(judge)
    assert judge(prompts=["q"], completions=["good c"], references=["r"]) == [1.0]
    assert slept == [0.05, 0.05]


def test_retries_exhausted_raise_clear_error(server):
    server.script["good d"] = [("status", 500)] * 3
    judge = make_judge(server, max_retries=2)
    with pytest.raises(JudgeError) as info:
        judge(prompts=["q", "q"], completions=["good e", "good d"], references=["r", "r"])
    msg = str(info.value)
    assert "item 1" in msg and "3 attempt(s)" in msg and "HTTP 500" in msg and "judge-model" in msg
    assert len(server.times["good d"]) == 3


def test_retries_exhausted_fallback_counted(server, caplog):
    server.script["good f"] = [("status", 503)] * 2
    judge = make_judge(server, max_retries=1, fallback=0.0)
    with caplog.at_level(logging.WARNING, logger="grao.judges"):
        out = judge(prompts=["q", "q"], completions=["good f", "bad g"], references=["r", "r"])
    assert out == [0.0, -1.0]
    assert judge.stats()["fallbacks"] == 1
    assert any("fallback" in r.getMessage() and "item 0" in r.getMessage() for r in caplog.records)


def test_client_errors_not_retried(server):
    server.script["good h"] = [("status", 400)]
    judge = make_judge(server, fallback=0.0)  # the fallback does not hide a configuration error
    with pytest.raises(JudgeError, match="HTTP 400.*not retried"):
        judge(prompts=["q"], completions=["good h"], references=["r"])
    assert len(server.requests) == 1
    bad_path = ChatCompletionsJudge("m", base_url=server.url + "/wrong", api_key_env=KEY_ENV, trust_env=False)
    with pytest.raises(JudgeError, match="HTTP 404"):
        bad_path(prompts=["q"], completions=["good"], references=["r"])


def test_malformed_answers_retried_then_error_or_fallback(server):
    server.script["good i"] = [("ok", "I think the first one."), ("raw", "<html>oops</html>"),
                               ("raw", json.dumps({"choices": []}))]
    judge = make_judge(server)
    assert judge(prompts=["q"], completions=["good i"], references=["r"]) == [1.0]
    assert judge.stats()["malformed"] == 1 and judge.stats()["retries"] == 3

    server.script["good j"] = [("ok", "both are fine")] * 4
    with pytest.raises(JudgeError, match="no verdict.*both are fine"):
        judge(prompts=["q"], completions=["good j"], references=["r"])

    server.script["good k"] = [("ok", "1 > 2 and 1 < 2")]
    strict = make_judge(server, retry_malformed=False, fallback=-1.0)
    assert strict(prompts=["q"], completions=["good k"], references=["r"]) == [-1.0]
    assert len(server.times["good k"]) == 1 and strict.stats()["fallbacks"] == 1


def test_timeouts_retried(server):
    server.script["good l"] = [("sleep", 1.0)]
    judge = make_judge(server, timeout=0.2)
    start = time.monotonic()
    assert judge(prompts=["q"], completions=["good l"], references=["r"]) == [1.0]
    assert time.monotonic() - start < 1.0  # did not wait for the slow answer
    assert len(server.times["good l"]) == 2

    always_slow = make_judge(server, timeout=0.1, max_retries=1)
    with pytest.raises(JudgeError, match="timed out after 0.1 s"):
        always_slow(prompts=["q"], completions=["slow:0.5"], references=["r"])


def test_connection_refused_retried_then_error():
    import socket
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = ChatCompletionsJudge("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV, max_retries=1,
                                 backoff_base=0.001, trust_env=False)
    with pytest.raises(JudgeError, match="2 attempt.*connection error"):
        judge(prompts=["q"], completions=["a"], references=["r"])


# ------------------------------------------------------------------------------------- concurrency


def test_concurrency_limit(server):
    judge = make_judge(server, max_concurrency=3)
    completions = [f"slow:0.1 #{i}" for i in range(12)]
    start = time.monotonic()
    out = judge(prompts=["q"] * 12, completions=completions, references=["r"] * 12)
    elapsed = time.monotonic() - start
    assert out == [1.0] * 12 and len(server.requests) == 12
    assert server.max_in_flight <= 3
    assert server.max_in_flight >= 2  # requests do run in parallel
    assert elapsed >= 4 * 0.1 * 0.9  # 12 requests of 0.1 s, at most 3 at a time


def test_concurrency_limit_shared_across_threads(server):
    # a generous socket timeout: this test failed once on a loaded machine, and a 2 s timeout that retries a
    # request (13 requests) is the likely cause; what is tested here is the shared limit, not the timeout
    judge = make_judge(server, max_concurrency=2, timeout=30.0)
    results = {}

    def run(tag):
        cs = [f"slow:0.08 {tag}{i}" for i in range(4)]
        results[tag] = judge(prompts=["q"] * 4, completions=cs, references=["r"] * 4)

    threads = [threading.Thread(target=run, args=(t,)) for t in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == [1.0] * 4 for v in results.values()) and len(server.requests) == 12
    assert server.max_in_flight <= 2


# ------------------------------------------------------------------------------------- the API key


def test_api_key_never_leaks(server, caplog):
    server.script["good m"] = [("status", 500), ("ok", "nonsense")]
    server.script["good n"] = [("echo_auth", 401)]
    server.script["good o"] = [("echo_auth", 503)] * 2
    judge = make_judge(server, max_retries=2)
    texts = [repr(judge), str(judge), json.dumps(judge.config()), repr(judge.__dict__)]
    blob = pickle.dumps(judge)
    assert SECRET.encode() not in blob
    clone = pickle.loads(blob)
    assert clone.config() == judge.config()
    with caplog.at_level(logging.DEBUG):
        assert judge(prompts=["q"], completions=["good m"], references=["r"]) == [1.0]
        assert clone(prompts=["q"], completions=["bad p"], references=["r"]) == [-1.0]  # works after unpickling
        with pytest.raises(JudgeError) as unauthorised:
            judge(prompts=["q"], completions=["good n"], references=["r"])
        fallback = make_judge(server, max_retries=1, fallback=0.0)
        assert fallback(prompts=["q"], completions=["good o"], references=["r"]) == [0.0]
    # the servers did see the key, so the echoes really contained it
    assert any(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert "401" in str(unauthorised.value) and "***" in str(unauthorised.value)
    texts.append("".join(traceback.format_exception(unauthorised.value)))
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert any("***" in t for t in texts)  # the echoed key was masked in a retry log line
    for t in texts:
        assert SECRET not in t


def test_default_template_fields():
    assert all("{" + f + "}" in DEFAULT_TEMPLATE for f in ("prompt", "completion", "reference"))
    for verdict in ("1 > 2", "1 = 2", "1 < 2"):
        assert verdict in DEFAULT_TEMPLATE

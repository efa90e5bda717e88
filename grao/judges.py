"""An LLM judge behind an OpenAI-compatible chat-completions endpoint, as a GRAO reward R(o, y).

The paper judges each completion o against the reference answer y with an LLM and a fixed prompt;
:class:`ChatCompletionsJudge` does that against any server that speaks the OpenAI
``POST {base_url}/chat/completions`` protocol (OpenAI, vLLM, SGLang, llama.cpp, TGI, ...). It is a
reward callable with the TRL-compatible signature ``judge(prompts, completions, references, **columns)``
(``references`` may also arrive as ``solution``) returning one value in {+1, 0, -1} per completion:
+1 when Response 1 (the completion) is better than Response 2 (the reference), 0 for a tie, -1 when
worse. A completion identical to its reference (up to whitespace) gets 0 without a request, so
R(y, y) = 0 as the spec requires.

Only the standard library is used (urllib, concurrent.futures). Robustness:

* ``timeout`` seconds per socket operation of a request;
* up to ``max_retries`` retries of a request after a timeout, a connection error, HTTP 408/409/429/5xx
  or a malformed answer, sleeping ``backoff_base * 2**k`` seconds times a random factor in
  [1, 1 + jitter] before retry k + 1 (a server's ``Retry-After`` is honoured instead when given),
  each sleep capped at ``backoff_max``; other HTTP errors (400, 401, 403, 404, ...) are not retried;
* at most ``max_concurrency`` requests in flight at once, across all threads using this judge;
* after the retries are spent, a :class:`JudgeError` naming the item, the attempts and the last
  failure, or (``fallback=0.0``, say) that value, counted in :meth:`stats` and logged. Errors that
  retrying cannot fix (bad key, unknown model, bad URL) always raise.

The API key is read from the environment variable named by ``api_key_env`` (default
``OPENAI_API_KEY``) each time a request is built. It is never stored on the object, so it cannot
reach its ``repr``, :meth:`config`, a pickle or a checkpoint, and any server text quoted in an
error or log message has the key masked.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

log = logging.getLogger(__name__)

#: Fixed judging prompt (the paper's setting: the answer is compared with the reference answer).
DEFAULT_SYSTEM_PROMPT = "You are an impartial expert judge. You compare two responses to the same question."

DEFAULT_TEMPLATE = """Compare the quality of two responses to the question below: how correct, helpful, \
complete and clear each one is. Judge the content, not the length or the style.

[Question]
{prompt}

[Response 1]
{completion}

[Response 2]
{reference}

Answer with exactly one of these verdicts and nothing else:
1 > 2   (Response 1 is better)
1 = 2   (the two responses are equally good)
1 < 2   (Response 2 is better)"""

TEMPLATE_FIELDS = ("prompt", "completion", "reference")

#: HTTP statuses worth retrying: request timeout, conflict, rate limit and server errors.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})

_VERDICT = re.compile(r"(?<![\w.])([12])\s*(>=|<=|=>|=<|==|>|<|=|≥|≤)\s*([12])(?![\w.])")
_MASK = "***"


class JudgeError(RuntimeError):
    """The judge could not produce a verdict (bad configuration, a non-retryable HTTP error, or a
    failure that persisted through every retry). The message never contains the API key."""


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may fix. ``retry_after``: the server's wait, s."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_verdict(text: str) -> int:
    """The verdict in a judge's answer as +1 ("1 > 2"), 0 ("1 = 2") or -1 ("1 < 2").

    Tolerates surrounding words, quotes, markdown, "Verdict:" prefixes, the reversed forms
    ("2 < 1" is "1 > 2") and the comparison signs ``>=``/``==``-style variants (read as ``>``/``=``).
    Raises ValueError when the answer holds no verdict or contradictory ones.
    """
    if not isinstance(text, str):
        raise ValueError(f"the answer is not text: {type(text).__name__}")
    cleaned = text.replace("`", " ").replace("*", " ").replace('"', " ").replace("'", " ")
    found = set()
    for left, sign, right in _VERDICT.findall(cleaned):
        if left == right:
            continue  # "1 = 1" and the like say nothing about the pair
        sign = {">=": ">", "=>": ">", "≥": ">", "<=": "<", "=<": "<", "≤": "<", "==": "="}.get(sign, sign)
        value = {">": 1, "=": 0, "<": -1}[sign]
        found.add(value if left == "1" else -value)
    if len(found) == 1:
        return found.pop()
    excerpt = " ".join(text.split())[:200]
    if not found:
        raise ValueError(f"no verdict '1 > 2', '1 = 2' or '1 < 2' in the answer {excerpt!r}")
    raise ValueError(f"contradictory verdicts in the answer {excerpt!r}")


def _as_text(value: Any) -> str:
    """A prompt or completion as text: a string, or TRL's conversational form (a list of
    {"role", "content"} messages, content a string or a list of {"type": "text", "text"} parts)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        lines = []
        for m in value:
            content = m.get("content", "")
            if isinstance(content, (list, tuple)):
                content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
            lines.append(f"{m['role']}: {content}" if len(value) > 1 and "role" in m else str(content))
        return "\n".join(lines)
    return str(value)


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class ChatCompletionsJudge:
    """Pairwise LLM judge R(o, y) in {+1, 0, -1} over an OpenAI-compatible chat-completions API.

    Args:
        model: the model name sent in each request.
        base_url: the API root; requests go to ``{base_url}/chat/completions``.
        api_key_env: name of the environment variable holding the API key (sent as
            ``Authorization: Bearer``); None for servers without authentication. The variable must be
            set when the judge is built and is read again for each request.
        timeout: seconds allowed for each socket operation of a request (connect, send, each read).
        max_retries: further attempts after a failed one (so at most max_retries + 1 requests per item).
        backoff_base, backoff_max, jitter: retry k (k = 0, 1, ...) waits
            ``min(backoff_max, backoff_base * 2**k * U[1, 1 + jitter])`` seconds, or the server's
            ``Retry-After`` (capped at backoff_max) when it sends one.
        max_concurrency: most requests in flight at once (shared by every thread using this judge).
        template: the user message; must contain ``{prompt}``, ``{completion}`` (Response 1) and
            ``{reference}`` (Response 2). system_prompt: the system message, or None for none.
        temperature, max_tokens: sampling settings sent with each request (max_tokens None: not sent).
        extra_body: more JSON fields merged into each request body (e.g. ``{"seed": 0}``).
        fallback: None (default) raises :class:`JudgeError` when an item still fails after the retries;
            a number in [-1, 1] is returned for such an item instead (counted in ``stats()["fallbacks"]``).
        retry_malformed: also retry answers holding no verdict (sampling may fix them).
        trust_env: use proxies from the environment (HTTP(S)_PROXY, NO_PROXY) as urllib does.

    Call it as a reward: ``judge(prompts=..., completions=..., references=...)`` (or ``solution=``)
    -> list of floats, one per completion.
    """

    def __init__(self, model: str, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 4,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, jitter: float = 0.25,
                 max_concurrency: int = 8, template: str = DEFAULT_TEMPLATE,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, temperature: float = 0.0,
                 max_tokens: int | None = 16, extra_body: dict | None = None, fallback: float | None = None,
                 retry_malformed: bool = True, trust_env: bool = True, name: str = "llm_judge"):
        if not isinstance(model, str) or not model:
            raise JudgeError(f"model must be a non-empty string, got {model!r}")
        parts = urllib.parse.urlsplit(str(base_url))
        if parts.username is not None or parts.password is not None:
            raise JudgeError("base_url must not contain credentials (user:password@); put the API key in the "
                             "environment variable named by api_key_env")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise JudgeError(f"base_url must be an http(s) URL such as https://api.openai.com/v1, got {base_url!r}")
        if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env):
            raise JudgeError(f"api_key_env must be the name of an environment variable or None, got {api_key_env!r}")

        def number(arg, value, low, *, integer=False, allow_equal=True):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value >= low if allow_equal else value > low) and (not integer or int(value) == value)
            if not ok:
                kind = "an integer" if integer else "a number"
                raise JudgeError(f"{arg} must be {kind} {'>=' if allow_equal else '>'} {low}, got {value!r}")
            return int(value) if integer else float(value)

        self.model = model
        self.base_url = str(base_url).rstrip("/")
        self.api_key_env = api_key_env
        self.timeout = number("timeout", timeout, 0, allow_equal=False)
        self.max_retries = number("max_retries", max_retries, 0, integer=True)
        self.backoff_base = number("backoff_base", backoff_base, 0)
        self.backoff_max = number("backoff_max", backoff_max, 0)
        self.jitter = number("jitter", jitter, 0)
        self.max_concurrency = number("max_concurrency", max_concurrency, 1, integer=True)
        missing = [f for f in TEMPLATE_FIELDS if "{" + f + "}" not in template]
        if missing:
            raise JudgeError(f"template must contain the fields {{prompt}}, {{completion}} and {{reference}}; "
                             f"missing {', '.join('{' + f + '}' for f in missing)}")
        try:
            template.format(prompt="", completion="", reference="")
        except (KeyError, IndexError, ValueError) as exc:
            raise JudgeError(f"template is not a valid str.format template ({exc!r}); write literal braces "
                             f"as '{{{{' and '}}}}'") from None
        self.template = template
        self.system_prompt = system_prompt
        self.temperature = number("temperature", temperature, 0)
        self.max_tokens = None if max_tokens is None else number("max_tokens", max_tokens, 1, integer=True)
        self.extra_body = dict(extra_body or {})
        if fallback is not None:
            fallback = number("fallback", fallback, -1)
            if fallback > 1:
                raise JudgeError(f"fallback must be None or a number in [-1, 1], got {fallback!r}")
        self.fallback = fallback
        self.retry_malformed = bool(retry_malformed)
        self.trust_env = bool(trust_env)
        self.__name__ = str(name)
        self._api_key()  # fail now, not at the first training step, when the variable is missing
        if parts.scheme == "http" and api_key_env is not None and parts.hostname not in ("127.0.0.1", "localhost",
                                                                                           "::1"):
            log.warning("judge %s: the API key from $%s is sent over plain http to %s", self.__name__,
                        api_key_env, parts.hostname)
        self._setup_runtime()

    # ------------------------------------------------------------------------------------------- state
    def _setup_runtime(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "malformed": 0, "fallbacks": 0, "skipped_identical": 0,
                        "verdicts": 0}
        self._rng = random.Random()
        self._sleep = time.sleep
        handlers = [] if self.trust_env else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def config(self) -> dict:
        """The judge's settings as plain JSON-able values (never the API key: only its variable's name)."""
        return {"model": self.model, "base_url": self.base_url, "api_key_env": self.api_key_env,
                "timeout": self.timeout, "max_retries": self.max_retries, "backoff_base": self.backoff_base,
                "backoff_max": self.backoff_max, "jitter": self.jitter, "max_concurrency": self.max_concurrency,
                "template": self.template, "system_prompt": self.system_prompt, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "extra_body": dict(self.extra_body), "fallback": self.fallback,
                "retry_malformed": self.retry_malformed, "trust_env": self.trust_env, "name": self.__name__}

    def __getstate__(self) -> dict:
        # only the settings: locks and the opener are rebuilt on unpickling, the key was never stored
        return self.config()

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        self.__name__ = state.pop("name")
        self.__dict__.update(state)
        self._setup_runtime()

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self.api_key_env else "none"
        return (f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
                f"api_key={key}, timeout={self.timeout}, max_retries={self.max_retries}, "
                f"max_concurrency={self.max_concurrency}, fallback={self.fallback})")

    __str__ = __repr__

    def stats(self) -> dict[str, int]:
        """Counters since construction: requests sent, retries, malformed answers, fallbacks used,
        pairs skipped because the completion equals the reference, verdicts obtained."""
        with self._lock:
            return dict(self._counts)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(f"the judge's API key variable ${self.api_key_env} is not set (or empty); set it, or "
                             f"pass api_key_env=None for a server without authentication")
        return key

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, _MASK) if key else text

    # ------------------------------------------------------------------------------------------ requests
    def messages(self, prompt: Any, completion: Any, reference: Any) -> list[dict[str, str]]:
        """The chat messages sent to judge one (prompt, completion, reference) triple."""
        user = self.template.format(prompt=_as_text(prompt), completion=_as_text(completion),
                                    reference=_as_text(reference))
        msgs = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return msgs + [{"role": "user", "content": user}]

    def _request_once(self, body: bytes) -> str:
        """One POST; the answer's text, or _Retryable / JudgeError."""
        request = urllib.request.Request(self.base_url + "/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Accept": "application/json", "User-Agent": "grao-judge"})
        key = self._api_key()
        if key is not None:
            # unredirected: never forwarded to another host if the server redirects
            request.add_unredirected_header("Authorization", f"Bearer {key}")
        with self._slots:
            self._count("requests")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read(2000).decode("utf-8", "replace")
                except Exception:  # noqa: BLE001 - the body is only quoted in a message
                    detail = ""
                detail = self._redact(" ".join(detail.split()))[:300]
                reason = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
                if exc.code in RETRY_STATUSES:
                    wait = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                    raise _Retryable(reason, wait) from None
                raise JudgeError(f"judge request to {self.base_url}/chat/completions failed with "
                                 f"{reason} (not retried)") from None
            except (TimeoutError, socket.timeout) as exc:
                raise _Retryable(f"timed out after {self.timeout:g} s ({type(exc).__name__})") from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                    raise _Retryable(f"timed out after {self.timeout:g} s") from None
                raise _Retryable(f"connection error: {self._redact(str(exc.reason))}") from None
            except (OSError, http.client.HTTPException) as exc:  # reset, refused, incomplete read, ...
                raise _Retryable(f"connection error: {type(exc).__name__}: {self._redact(str(exc))}") from None
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            excerpt = self._redact(" ".join(raw[:300].decode("utf-8", "replace").split()))
            raise _Retryable(f"malformed response (not a chat completion): {excerpt!r}") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _Retryable(f"malformed response: message content is {type(content).__name__}")
        return content

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.backoff_max, retry_after)
        delay = self.backoff_base * (2.0 ** attempt) * (1.0 + self.jitter * self._rng.random())
        return min(self.backoff_max, delay)

    def judge_one(self, prompt: Any, completion: Any, reference: Any, *, index: int | None = None) -> float:
        """R(completion, reference) in {+1.0, 0.0, -1.0} (or the fallback), with retries."""
        if _same(_as_text(completion), _as_text(reference)):
            self._count("skipped_identical")
            return 0.0
        body = {"model": self.model, "messages": self.messages(prompt, completion, reference),
                "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        data = json.dumps(body).encode("utf-8")
        where = f"item {index}" if index is not None else "the item"
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                answer = self._request_once(data)
                try:
                    verdict = parse_verdict(answer)
                except ValueError as exc:
                    self._count("malformed")
                    reason = self._redact(str(exc))
                    if not self.retry_malformed:
                        last = reason
                        break
                    raise _Retryable(reason) from None
                self._count("verdicts")
                return float(verdict)
            except _Retryable as exc:
                last, retry_after = exc.reason, exc.retry_after
            if attempt < self.max_retries:
                delay = self._backoff(attempt, retry_after)
                self._count("retries")
                log.info("judge %s: %s, attempt %d of %d failed: %s; retrying in %.3f s", self.__name__, where,
                         attempt + 1, self.max_retries + 1, last, delay)
                self._sleep(delay)
        attempts = attempt + 1
        if self.fallback is not None:
            self._count("fallbacks")
            log.warning("judge %s: %s failed after %d attempt(s) (%s); using the fallback %g", self.__name__, where,
                        attempts, last, self.fallback)
            return self.fallback
        raise JudgeError(f"judge {self.__name__} (model {self.model!r} at {self.base_url}): {where} "
                         f"failed after {attempts} attempt(s); last failure: {last}. Raise max_retries or timeout, "
                         f"or pass fallback=0.0 to score such items as ties")

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
                 references: Sequence[Any] | None = None, *, solution: Sequence[Any] | None = None,
                 **columns: Any) -> list[float]:
        """R(o, y) for each completion: +1.0 better than its reference, 0.0 tie, -1.0 worse.

        prompts, completions, references (or ``solution``, TRL's column name): equal-length sequences
        of strings or conversational message lists; other columns are ignored. Identical triples are
        judged once; a completion equal to its reference is 0.0 without a request.
        """
        completions = list(completions)
        refs = references if references is not None else solution
        if refs is None:
            raise JudgeError("the judge needs the reference answers: pass references= (or TRL's solution=)")
        refs = list(refs)
        prompts = [None] * len(completions) if prompts is None else list(prompts)
        if not (len(prompts) == len(completions) == len(refs)):
            raise JudgeError(f"prompts, completions and references must have one entry per completion; got "
                             f"{len(prompts)}, {len(completions)} and {len(refs)}")
        keys = [json.dumps([_as_text(p), _as_text(c), _as_text(r)])
                for p, c, r in zip(prompts, completions, refs, strict=True)]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = list(first.values())
        results: dict[int, float] = {}
        if len(todo) == 1:
            i = todo[0]
            results[i] = self.judge_one(prompts[i], completions[i], refs[i], index=i)
        elif todo:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo)),
                                    thread_name_prefix="grao-judge") as pool:
                futures = {i: pool.submit(self.judge_one, prompts[i], completions[i], refs[i], index=i) for i in todo}
                try:
                    for i, fut in futures.items():
                        results[i] = fut.result()
                except BaseException:
                    for fut in futures.values():
                        fut.cancel()
                    raise
        return [results[first[k]] for k in keys]

"""Judge through any OpenAI-compatible chat endpoint, as the reference does (METHOD.md 3).

One request per rendered rubric: `max_tokens=1, temperature=0, logprobs=True,
top_logprobs=20, seed=0`; the single token's top-20 logprobs are aggregated
(`aggregate.py`). Requests run concurrently under a semaphore, are retried with
exponential backoff on 408/409/429/5xx, timeouts and connection errors (the SDK's own
retries are off so there is one retry policy), and their logprobs are cached on disk in
SQLite keyed by (model, aggregation, rendered prompt), so a rerun sends no request twice.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import math
import os
import random
import sqlite3
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from persona_jax.errors import PersonaError
from persona_jax.judges.aggregate import get_aggregator
from persona_jax.judges.base import Judge, Score, check_aligned
from persona_jax.judges.rubrics import COHERENCE_PROMPT, render

TopLogprobs = dict  # {token: logprob}
_RETRY_STATUS = (408, 409, 429)


def backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Seconds before retry number `attempt` + 1: min(max_delay, base_delay * 2**attempt)
    times a jitter in [0.5, 1] (jitter spreads out synchronized retries)."""
    return min(max_delay, base_delay * 2**attempt) * random.uniform(0.5, 1.0)


def retry_reason(exc, timeout: float) -> Optional[str]:
    """Why a failed OpenAI SDK call may be retried (408/409/429/5xx, a timeout, a lost
    connection, an HTTP 200 reply that is not whole JSON), or None when it may not. The project's one retry policy: the judge and
    the trait-artifact LLM both use it, with the SDK's own retries off."""
    import openai

    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
        # HTTP 200 whose body is cut off or not the API's JSON: a proxy or an overloaded
        # server; another attempt usually gets a whole reply
        return f"a reply that is not the API's JSON ({_short(str(exc))})"
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return f"HTTP {code}" if code in _RETRY_STATUS or code >= 500 else None
    if isinstance(exc, openai.APITimeoutError):
        return f"timeout after {timeout}s"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection error: {_short(str(exc.__cause__ or exc))}"
    return None


def run_sync(coro):
    """Run a coroutine to completion from sync code, with or without a running loop.

    Inside a running loop (Jupyter, an async app) `asyncio.run` is not allowed, so the
    coroutine runs on a fresh loop in a worker thread and this call blocks until it ends.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class JudgeCache:
    """Append-only SQLite store {sha256(model, aggregation, prompt): top-logprobs JSON}.

    SQLite commits are atomic, so a killed run keeps every answer received before the kill
    and several processes may share one file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS judge_cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        self._conn.commit()

    @staticmethod
    def key(model: str, aggregation: str, prompt: str) -> str:
        blob = json.dumps([model, aggregation, prompt], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, TopLogprobs]:
        out: dict[str, TopLogprobs] = {}
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 500):  # SQLite caps bound parameters per query
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            for k, v in self._conn.execute(
                f"SELECT key, value FROM judge_cache WHERE key IN ({marks})", part
            ):
                out[k] = dict(json.loads(v))
        return out

    def put(self, key: str, top_logprobs: TopLogprobs) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO judge_cache (key, value) VALUES (?, ?)",
            (key, json.dumps(list(top_logprobs.items()))),
        )
        self._conn.commit()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OpenAIJudge(Judge):
    """Judge with a model behind an OpenAI-compatible `/chat/completions` endpoint.

    Args:
      model: model name sent to the endpoint (default: the reference's judge).
      base_url: endpoint root, e.g. "http://127.0.0.1:8000/v1"; None uses the SDK default
        (`OPENAI_BASE_URL` or api.openai.com).
      api_key: key; None reads the environment variable `api_key_env`. Local servers that
        ignore keys still need a non-empty value.
      aggregation: "0_100" (reference default), "0_10" or "binary" for trait scores.
        Coherence always uses "0_100" because its rubric asks for 0..100.
      max_concurrency: requests in flight at once.
      max_retries: retries per request after the first attempt.
      timeout: seconds per request.
      retry_base_delay, retry_max_delay: backoff is
        min(retry_max_delay, retry_base_delay * 2**attempt) times a jitter in [0.5, 1].
      cache_path: SQLite file for the on-disk cache; None disables caching.
      progress: show a tqdm bar over requests.
      coherence_prompt: coherence rubric template ({question}, {answer}).
    """

    def __init__(
        self,
        model: str = "gpt-4.1-mini-2025-04-14",
        *,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        api_key_env: str = "OPENAI_API_KEY",
        aggregation: str = "0_100",
        max_concurrency: int = 16,
        max_retries: int = 6,
        timeout: float = 60.0,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        cache_path: Optional[str | os.PathLike] = None,
        progress: bool = True,
        coherence_prompt: str = COHERENCE_PROMPT,
    ):
        get_aggregator(aggregation)  # fail early on an unknown name
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        if not key:
            raise PersonaError(
                f"no API key for the judge at {base_url or 'the OpenAI API'}: set the "
                f"{api_key_env} environment variable or pass api_key (any non-empty string "
                "for a local server that ignores keys)."
            )
        if max_concurrency < 1 or max_retries < 0:
            raise PersonaError(
                f"judge max_concurrency={max_concurrency} and max_retries={max_retries} are "
                "invalid; use max_concurrency >= 1 and max_retries >= 0."
            )
        self.model = model
        self.base_url = base_url
        self._api_key = key
        self.aggregation = aggregation
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.progress = progress
        self.coherence_prompt = coherence_prompt
        self.requests_sent = 0  # HTTP attempts made by this object (retries included)

    # ---- Judge interface -------------------------------------------------------------
    def trait_scores(self, trait, eval_prompt, questions, answers) -> list[Score]:
        check_aligned(questions, answers)
        prompts = [render(eval_prompt, q, a) for q, a in zip(questions, answers)]
        return self.score_prompts(prompts, self.aggregation, desc=f"judge {trait}")

    def coherence_scores(self, questions, answers) -> list[Score]:
        check_aligned(questions, answers)
        prompts = [render(self.coherence_prompt, q, a) for q, a in zip(questions, answers)]
        return self.score_prompts(prompts, "0_100", desc="judge coherence")

    # ---- lower level -----------------------------------------------------------------
    def score_prompts(
        self, prompts: Sequence[str], aggregation: Optional[str] = None, desc: str = "judge"
    ) -> list[Score]:
        """Scores for already-rendered prompts ([n] -> [n] floats or None); sync."""
        return run_sync(self.ascore_prompts(prompts, aggregation, desc))

    async def ascore_prompts(
        self, prompts: Sequence[str], aggregation: Optional[str] = None, desc: str = "judge"
    ) -> list[Score]:
        """Async `score_prompts`."""
        aggregation = aggregation or self.aggregation
        agg = get_aggregator(aggregation)
        logprobs = await self.atop_logprobs(prompts, aggregation, desc)
        return [agg(lp) for lp in logprobs]

    async def atop_logprobs(
        self, prompts: Sequence[str], aggregation: Optional[str] = None, desc: str = "judge"
    ) -> list[TopLogprobs]:
        """[n] prompts -> [n] {token: logprob} (from the cache where possible)."""
        aggregation = aggregation or self.aggregation
        keys = [JudgeCache.key(self.model, aggregation, p) for p in prompts]
        unique = dict(zip(keys, prompts))  # identical prompts cost one request
        cache = JudgeCache(self.cache_path) if self.cache_path is not None else None
        try:
            results = cache.get_many(keys) if cache is not None else {}
            todo = [k for k in unique if k not in results]
            if todo:
                await self._fetch(todo, unique, results, cache, desc)
        finally:
            if cache is not None:
                cache.close()
        return [results[k] for k in keys]

    async def _fetch(self, todo, prompts_by_key, results, cache, desc) -> None:
        import openai

        client = openai.AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
        )
        url = str(client.base_url)
        sem = asyncio.Semaphore(self.max_concurrency)
        bar = tqdm(total=len(todo), desc=desc, disable=not self.progress, leave=False)

        async def one(key):
            async with sem:
                lp = await self._request(client, url, prompts_by_key[key])
            results[key] = lp
            if cache is not None:
                cache.put(key, lp)
            bar.update(1)

        tasks = [asyncio.create_task(one(k)) for k in todo]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One fatal error ends the run; stop the rest instead of leaving them running.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            await client.close()

    def _delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.retry_base_delay, self.retry_max_delay)

    async def _request(self, client, url: str, prompt: str) -> TopLogprobs:
        import openai

        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt - 1))
            self.requests_sent += 1
            try:
                completion = await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=20,
                    seed=0,
                )
            except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
                last = retry_reason(e, self.timeout)
                continue
            except (openai.APIStatusError, openai.APITimeoutError, openai.APIConnectionError) as e:
                reason = retry_reason(e, self.timeout)
                if reason is not None:
                    last = reason
                    continue
                code = e.status_code
                if code in (401, 403):
                    raise PersonaError(
                        f"judge endpoint {url} rejected the API key (HTTP {code}); check the key "
                        "you passed or its environment variable."
                    ) from None
                if code == 404:
                    raise PersonaError(
                        f"judge endpoint {url} answered 404 for model {self.model!r}; check the "
                        "model name and that base_url ends with the API root (often '/v1')."
                    ) from None
                raise PersonaError(
                    f"judge endpoint {url} refused the request with HTTP {code} "
                    f"({_short(e.message)}); check the model supports logprobs and top_logprobs=20."
                ) from None
            return _parse_top_logprobs(completion, url)
        raise PersonaError(
            f"judge endpoint {url} did not answer after {self.max_retries + 1} attempts (last: "
            f"{last}); check that the server is running and base_url is right, or raise "
            "max_retries/timeout (the config's judge.max_retries / judge.timeout)."
        )


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _parse_top_logprobs(completion, url: str) -> TopLogprobs:
    """{token: logprob} of the first generated token; {} when the endpoint returned no token.

    Later duplicates of a token overwrite earlier ones, as in the reference's dict build.
    """
    if not completion.choices:
        return {}
    choice = completion.choices[0]
    if choice.logprobs is None or choice.logprobs.content is None:
        raise PersonaError(
            f"judge endpoint {url} returned no logprobs; use a model and server that support "
            "logprobs=True with top_logprobs=20."
        )
    if not choice.logprobs.content:
        return {}
    out: TopLogprobs = {}
    for el in choice.logprobs.content[0].top_logprobs or []:
        lp = float(el.logprob)
        out[el.token] = lp if math.isfinite(lp) else -math.inf
    return out

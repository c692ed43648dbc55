"""Response evaluation: the book's LLM-as-judge (Ollama's /api/chat, or any OpenAI-compatible server) and offline overlap
scores (exact match, ROUGE-L) that need no judge."""
from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.error
import urllib.request
from typing import Any, Sequence

from tqdm.auto import tqdm

from gptjax.tasks.instruct_data import format_input

DEFAULT_URL = "http://localhost:11434"
DEFAULT_JUDGE = "llama3"  # the book's judge: Llama 3 8B Instruct served by Ollama


class JudgeUnavailableError(ConnectionError):
    """Nothing (or something that is not a chat endpoint) answers at the judge URL."""


def chat_url(url: str) -> str:
    """The chat endpoint of a judge URL: an OpenAI-compatible server ('.../v1' or '.../v1/chat/completions':
    vLLM, llama.cpp's server, Ollama) or Ollama's own API ('http://host:11434' or '.../api/chat')."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        return url + "/chat/completions"
    if url.endswith(("/api/chat", "/v1/chat/completions")):
        return url
    return url + "/api/chat"


def _post(endpoint: str, payload: dict, model: str, timeout: float):
    """POST `payload`; every way a judge can fail to answer becomes one JudgeUnavailableError."""
    headers = {"Content-Type": "application/json"}
    if endpoint.endswith("/v1/chat/completions") and os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(endpoint, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")[:300]
        with contextlib.suppress(json.JSONDecodeError, AttributeError):  # the server's own message, where it has one
            error = json.loads(body).get("error", body)
            body = error.get("message", error) if isinstance(error, dict) else error
        raise JudgeUnavailableError(f"the judge at {endpoint} answered HTTP {e.code}: {body}; check the model name "
                                    f"({model!r}, CLI: --judge-model) and the URL") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise JudgeUnavailableError(f"no judge answers at {endpoint} ({reason}); start one (`ollama serve`, then "
                                    f"`ollama pull {model}`; or vLLM / llama.cpp's server) or pass the URL of a "
                                    f"running one (CLI: --url; '.../v1' for an OpenAI-compatible server)") from None


def _lines(response, endpoint: str):
    """The JSON objects of Ollama's streamed answer, one per line."""
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                raise JudgeUnavailableError(f"{endpoint} did not answer with Ollama's JSON lines (got {line[:100]!r});"
                                            f" is it an Ollama /api/chat endpoint? (an OpenAI-compatible server: "
                                            f"--url .../v1)") from None
            if isinstance(msg, dict) and "error" in msg:
                raise JudgeUnavailableError(f"the judge at {endpoint} reported: {msg['error']}")
            yield msg


def query_model(prompt: str, model: str = DEFAULT_JUDGE, url: str = DEFAULT_URL, *, seed: int = 123,
                temperature: float = 0.0, num_ctx: int = 2048, timeout: float = 60.0) -> str:
    """The book's query_model: one user message to the judge, its whole reply back. Speaks Ollama's /api/chat
    (streamed JSON lines, as the book) or an OpenAI-compatible /v1/chat/completions, by the URL."""
    endpoint = chat_url(url)
    messages = [{"role": "user", "content": prompt}]
    if endpoint.endswith("/v1/chat/completions"):
        payload = {"model": model, "messages": messages, "seed": seed, "temperature": temperature, "stream": False}
        with _post(endpoint, payload, model, timeout) as response:
            body = response.read().decode("utf-8", "replace")
        try:
            return json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeUnavailableError(f"{endpoint} did not answer as an OpenAI chat completion (got "
                                        f"{body[:100]!r})") from None
    payload = {"model": model, "messages": messages,
               "options": {"seed": seed, "temperature": temperature, "num_ctx": num_ctx}}
    return "".join(m.get("message", {}).get("content", "")
                   for m in _lines(_post(endpoint, payload, model, timeout), endpoint))


def judge_prompt(entry: dict, json_key: str = "model_response", style: str = "alpaca") -> str:
    """The book's scoring prompt for one record."""
    return (f"Given the input `{format_input(entry, style)}` and correct output `{entry['output']}`, score the model "
            f"response `{entry[json_key]}` on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def generate_model_scores(entries: Sequence[dict], json_key: str = "model_response", model: str = DEFAULT_JUDGE,
                          url: str = DEFAULT_URL, *, style: str = "alpaca", progress: bool = True,
                          **query_kw: Any) -> dict[str, Any]:
    """The book's generate_model_scores: one judge score per record, `int(reply)`; replies that are not an
    integer, or an integer outside 0-100, are counted and left out of the mean. Returns scores, their mean,
    and the replies left out."""
    if missing := [i for i, e in enumerate(entries) if json_key not in e or "output" not in e]:
        raise ValueError(f"records {missing[:5]} lack '{json_key}' or 'output'; pass the responses JSON written by "
                         f"`gptjax respond` (or --key with the field holding the responses)")
    scores, unparsable, out_of_range = [], [], []
    for i, entry in enumerate(tqdm(entries, desc="Scoring entries", disable=not progress)):
        reply = query_model(judge_prompt(entry, json_key, style), model, url, **query_kw)
        try:
            score = int(reply)
        except ValueError:
            unparsable.append({"index": i, "reply": reply})
            continue
        if 0 <= score <= 100:
            scores.append(score)
        else:
            out_of_range.append({"index": i, "reply": reply})
    mean = sum(scores) / len(scores) if scores else float("nan")
    return {"scores": scores, "mean": mean, "n_scored": len(scores), "n_unparsable": len(unparsable),
            "unparsable": unparsable, "n_out_of_range": len(out_of_range), "out_of_range": out_of_range,
            "judge": model, "url": chat_url(url)}


# --- offline overlap scores ------------------------------------------------------------------------

def rouge_tokens(text: str) -> list[str]:
    """Google rouge_score's default tokenizer: lowercase, non-alphanumerics to spaces, no stemming."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = row[j]
            row[j] = prev + 1 if x == y else max(row[j], row[j - 1])
            prev = cur
    return row[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 (LCS over rouge tokens; F1 = 2PR / (P + R))."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    lcs = lcs_length(c, r)
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "f1": 0.0 if lcs == 0 else 2 * p * rec / (p + rec)}


def exact_match(candidate: str, reference: str) -> bool:
    """Equal after lowercasing and collapsing whitespace."""
    return candidate.lower().split() == reference.lower().split()


def text_scores(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L F1 of responses against their references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} responses for {len(references)} references")
    if not candidates:
        return {"exact_match": float("nan"), "rouge_l": float("nan")}
    n = len(candidates)
    return {"exact_match": sum(exact_match(c, r) for c, r in zip(candidates, references)) / n,
            "rouge_l": sum(rouge_l(c, r)["f1"] for c, r in zip(candidates, references)) / n}

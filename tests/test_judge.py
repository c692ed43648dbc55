import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from gptjax.cli import main
from gptjax.tasks.instruct_data import format_input
from gptjax.tasks.judge import (JudgeUnavailableError, chat_url, exact_match, generate_model_scores, judge_prompt,
                                lcs_length, query_model, rouge_l, rouge_tokens, text_scores)

ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."},
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome.", "model_response": "Rome."},
    {"instruction": "Name a color.", "input": "", "output": "Red.", "model_response": "I refuse."},
]


class FakeOllama(BaseHTTPRequestHandler):
    """/api/chat answering like Ollama: streamed JSON lines; the score depends on the response being judged."""
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOllama.requests.append((self.path, body))
        if self.path not in ("/api/chat", "/v1/chat/completions") or body["model"] != "llama3":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(json.dumps({"error": f"model '{body['model']}' not found"}).encode())
            return
        prompt = body["messages"][0]["content"]
        reply = "85" if "bullet" in prompt else "100" if "`Rome.`" in prompt else \
            "150" if "`Too high.`" in prompt else "-20" if "`Too low.`" in prompt else "I cannot score this."
        if self.path == "/v1/chat/completions":  # an OpenAI-compatible server (vLLM, llama.cpp, Ollama): one object
            answer = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                          "content": reply}}]}
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(answer).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for i in range(0, len(reply), 2):  # several chunks, as a streamed answer
            self.wfile.write((json.dumps({"message": {"role": "assistant", "content": reply[i:i + 2]},
                                          "done": False}) + "\n").encode())
        self.wfile.write((json.dumps({"message": {"role": "assistant", "content": ""}, "done": True}) + "\n").encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), FakeOllama)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeOllama.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_rouge_l_and_exact_match():
    assert rouge_tokens("The cat, the HAT!") == ["the", "cat", "the", "hat"]
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    r = rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert r["precision"] == r["recall"] == pytest.approx(5 / 6) and r["f1"] == pytest.approx(5 / 6)
    r = rouge_l("the cat", "the cat is on the mat")
    assert (r["precision"], r["recall"]) == (1.0, pytest.approx(1 / 3)) and r["f1"] == pytest.approx(0.5)
    assert rouge_l("", "x")["f1"] == 0.0 and rouge_l("a", "b")["f1"] == 0.0
    assert exact_match(" Rome.\n", "rome.") and not exact_match("Rome", "Rome.")
    assert text_scores(["Rome.", "x"], ["Rome.", "y"]) == {"exact_match": 0.5, "rouge_l": 0.5}


def test_judge_prompt_is_the_books():
    p = judge_prompt(ENTRIES[0])
    assert p == (f"Given the input `{format_input(ENTRIES[0])}` and correct output `The car is as fast as lightning.`, "
                 f"score the model response `The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is "
                 f"the best score. Respond with the integer number only.")


def test_scores_from_a_local_ollama(server):
    assert query_model("The car is as fast as a bullet", url=server) == "85"
    path, body = FakeOllama.requests[0]
    assert path == "/api/chat" and body == {"model": "llama3", "messages": [
        {"role": "user", "content": "The car is as fast as a bullet"}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    out = generate_model_scores(ENTRIES, url=server + "/api/chat", progress=False)
    assert out["scores"] == [85, 100] and out["mean"] == 92.5
    assert out["n_unparsable"] == 1 and out["unparsable"][0] == {"index": 2, "reply": "I cannot score this."}
    with pytest.raises(JudgeUnavailableError, match="HTTP 404: model 'llama9' not found"):
        query_model("x", model="llama9", url=server)


def test_a_score_outside_0_to_100_is_counted_and_left_out(server):
    entries = ENTRIES[:2] + [{**ENTRIES[2], "model_response": "Too high."}, {**ENTRIES[2], "model_response": "Too low."}]
    out = generate_model_scores(entries, url=server, progress=False, timeout=5)
    assert out["scores"] == [85, 100] and out["mean"] == 92.5 and out["n_unparsable"] == 0
    assert out["n_out_of_range"] == 2 and out["out_of_range"] == [{"index": 2, "reply": "150"},
                                                                  {"index": 3, "reply": "-20"}]


def test_no_judge_is_one_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnavailableError,
                       match=rf"no judge answers at http://127.0.0.1:{port}/api/chat .*ollama serve"):
        query_model("x", url=f"http://127.0.0.1:{port}", timeout=5)
    assert chat_url("http://h:1/") == "http://h:1/api/chat" == chat_url("http://h:1/api/chat")


def test_cli_judge(tmp_path, server, capsys):
    data = tmp_path / "responses.json"
    data.write_text(json.dumps(ENTRIES))
    assert main(["judge", "--data", str(data), "--url", server, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Number of scores: 2 of 3 (1 replies were not an integer and 0 outside 0-100" in out
    assert "Average score: 92.50" in out
    saved = json.loads((tmp_path / "responses-scores.json").read_text())
    assert saved["judge"]["scores"] == [85, 100] and saved["offline"]["exact_match"] == pytest.approx(1 / 3)
    assert main(["judge", "--data", str(data), "--offline", "--out", str(tmp_path / "o.json")]) == 0
    assert "| responses.json | 3 |" in capsys.readouterr().out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["judge", "--data", str(data), "--url", f"http://127.0.0.1:{port}", "--quiet", "--overwrite"]) == 2
    assert "no judge answers" in capsys.readouterr().err


def test_the_judge_speaks_the_openai_protocol_too(server):
    assert chat_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions" == chat_url("http://h:8000/v1/chat/completions")
    scores = generate_model_scores(ENTRIES, url=server + "/v1", progress=False)
    assert scores["scores"] == [85, 100] and scores["n_unparsable"] == 1
    path, body = FakeOllama.requests[-1]
    assert path == "/v1/chat/completions" and body["stream"] is False and body["temperature"] == 0.0
    with pytest.raises(JudgeUnavailableError, match=r"answered HTTP 404: model 'llama9' not found; check the model"):
        query_model("x", model="llama9", url=server + "/v1")

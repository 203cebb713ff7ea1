"""`parscale serve` on a loopback port: token-id completions, usage, prompt log-probabilities and
echo of the user's prompt only, a refused long prompt, a clean stop."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import MAX_MODEL_LEN, N_PREFIX, reference_generate, reference_prompt_logprobs, save_char_tokenizer

from parscale import ParScaleForCausalLM

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    save_char_tokenizer(checkpoints[2])  # text prompts and echoed text (token-id prompts work as well)
    command = [sys.executable, "-m", "parscale", "serve", "--model", str(checkpoints[2]), "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1",
               "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "32", "--max-num-seqs", "8"]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the server's own way
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    base = f"http://{HOST}:{port}"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(2)
    if process.poll() is not None or time.time() >= deadline:
        process.kill()
        pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
    yield base, process, log
    if process.poll() is None:
        process.kill()


def test_completions_with_token_ids_equal_transformers(server, checkpoints):
    base, _, _ = server
    reference = ParScaleForCausalLM.from_pretrained(checkpoints[2]).eval()
    model = str(checkpoints[2].resolve())
    for prompt in ([3, 1, 4, 1, 5], list(range(20, 60))):
        status, body = _post(f"{base}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 6,
                                                         "temperature": 0, "return_token_ids": True,
                                                         "ignore_eos": True})
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == reference_generate(reference, prompt, 6)[0]


def _stream(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        lines = [line.decode().strip() for line in response]
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]


def test_usage_and_prompt_logprobs_cover_the_users_prompt(server, checkpoints):
    base, _, _ = server
    reference = ParScaleForCausalLM.from_pretrained(checkpoints[2]).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    body = {"model": str(checkpoints[2].resolve()), "prompt": prompt, "max_tokens": 2, "temperature": 0,
            "ignore_eos": True}
    status, answer = _post(f"{base}/v1/completions", {**body, "prompt_logprobs": 0, "return_token_ids": True})
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == len(prompt) and answer["usage"]["completion_tokens"] == 2
    choice = answer["choices"][0]
    assert choice["prompt_token_ids"] == prompt
    assert len(choice["prompt_logprobs"]) == len(prompt) and choice["prompt_logprobs"][0] is None
    got = [step[str(t)]["logprob"] for step, t in zip(choice["prompt_logprobs"][1:], prompt[1:])]
    assert max(abs(a - b) for a, b in zip(got, reference_prompt_logprobs(reference, prompt))) < 1e-3
    chunks = _stream(f"{base}/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"]["prompt_tokens"] == len(prompt)


def test_echo_is_the_users_prompt_with_its_logprobs(server, checkpoints):
    base, _, _ = server
    reference = ParScaleForCausalLM.from_pretrained(checkpoints[2]).eval()
    text = "def main("
    ids = [ord(c) for c in text]  # the character tokenizer: one id per character
    new = reference_generate(reference, ids, 3)[0]
    body = {"model": str(checkpoints[2].resolve()), "prompt": text, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "echo": True, "logprobs": 0}
    status, answer = _post(f"{base}/v1/completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    expected_tokens = list(text) + [chr(t) for t in new]
    assert choice["text"] == "".join(expected_tokens)
    assert choice["logprobs"]["tokens"] == expected_tokens
    assert choice["logprobs"]["text_offset"] == list(range(len(expected_tokens)))
    echoed = choice["logprobs"]["token_logprobs"][:len(ids)]
    assert echoed[0] is None
    assert max(abs(a - b) for a, b in zip(echoed[1:], reference_prompt_logprobs(reference, ids))) < 1e-3
    assert answer["usage"]["prompt_tokens"] == len(ids)
    streamed = [chunk["choices"][0] for chunk in _stream(f"{base}/v1/completions", body) if chunk["choices"]]
    assert "".join(c["text"] for c in streamed) == "".join(expected_tokens)
    assert [token for c in streamed for token in c["logprobs"]["tokens"]] == expected_tokens


def test_prompt_longer_than_the_usable_context_is_a_400(server, checkpoints):
    base, _, _ = server
    usable = MAX_MODEL_LEN - N_PREFIX
    status, body = _post(f"{base}/v1/completions", {"model": str(checkpoints[2].resolve()),
                                                     "prompt": [7] * usable, "max_tokens": 1})
    assert status == 400
    assert "usable context" in json.dumps(body)


def test_server_stops_cleanly(server):
    _, process, log = server
    before = len(log.read_text())  # (vLLM logs a chat-template warm-up warning at start without a tokenizer)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    after = log.read_text()[before:]
    # vLLM 0.32 has a shutdown race of its own: on a loaded machine its engine process can stop
    # before the server's output loop does, which then logs EngineDeadError with a traceback
    # although the server exits cleanly (0). That one is tolerated; any other traceback is not.
    tracebacks = after.count("Traceback")
    assert tracebacks == after.count("EngineDeadError: EngineCore encountered an issue"), after[-3000:]
    assert "parscale" not in "".join(line for line in after.splitlines() if 'File "' in line)

"""`memtool serve-local`: --prompt streams the answer, --json, --chat, and one-line errors."""

import json
import re
import signal
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from memtool.cli.app import app
from memtool.serve import GenerationParams, complete

runner = CliRunner()


def _run(*args, **kwargs):
    return runner.invoke(app, ["serve-local", *(str(a) for a in args)], **kwargs)


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_prompt_prints_the_generated_text(tiny_llama_dir, tiny_engine):
    prompt = "The river of the city"
    expected = complete(tiny_engine, prompt, GenerationParams(max_tokens=12)).text
    result = _run(tiny_llama_dir, "--prompt", prompt, "--max-tokens", 12)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "peak RSS" in result.stderr


def test_prompt_json(tiny_llama_dir, tiny_engine):
    prompt = "The river of the city"
    expected = complete(tiny_engine, prompt, GenerationParams(max_tokens=8))
    result = _run(tiny_llama_dir, "--prompt", prompt, "--max-tokens", 8, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert payload["text"] == expected.text
    assert payload["tokens"] == expected.completion_tokens
    assert payload["prompt_tokens"] == expected.prompt_tokens
    assert payload["tokens_per_s"] > 0 and payload["peak_rss_bytes"] > 0


def test_chat_keeps_history_and_exits(tiny_chat_dir):
    result = _run(tiny_chat_dir, "--chat", "--max-tokens", 4, input="hello\n\nthe river\n/exit\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("> ") == 4  # two turns, one blank line, then /exit
    assert result.stderr.count("tokens/s") == 2


def test_chat_ends_at_end_of_input(tiny_chat_dir):
    result = _run(tiny_chat_dir, "--chat", "--max-tokens", 2, input="hello\n")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "exactly one of --prompt"),
        (["--prompt", "x", "--chat"], "got --prompt and --chat"),
        (["--prompt", "x", "--host", "0.0.0.0"], "--host applies to --port"),
        (["--chat", "--api-key", "k"], "--api-key applies to --port"),
        (["--chat", "--json"], "--json applies to --prompt"),
        (["--prompt", "x", "--max-tokens", 0], "max_tokens must be at least 1"),
        (["--prompt", "x", "--temperature", -1], "temperature"),
        (["--port", 70000], "port must be in"),
        (["--port", 0, "--max-queue", -1], "max_queue"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_llama_dir, args, words):
    result = _run(tiny_llama_dir, *args)
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_model_problems_exit_2_with_one_line(tmp_path, tiny_llama_dir):
    result = _run(tmp_path / "missing", "--prompt", "x")
    assert result.exit_code == 2 and len(_error_lines(result)) == 1
    result = _run(tiny_llama_dir, "--chat")  # the tiny tokenizer has no chat template
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and "no chat template" in lines[0]
    result = _run(tiny_llama_dir, "--prompt", "river " * 200)
    lines = _error_lines(result)
    assert result.exit_code == 2 and len(lines) == 1 and "128" in lines[0]


@pytest.mark.real
def test_real_model_knows_the_capital_of_france():
    result = _run("--prompt", "The capital of France is", "--max-tokens", 8)
    assert result.exit_code == 0, result.stderr
    assert "Paris" in result.stdout


def test_port_serves_until_interrupted(tiny_llama_dir):
    command = [sys.executable, "-m", "memtool", "serve-local", str(tiny_llama_dir), "--port", "0"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line, "the server exited before it listened"
        url = re.search(r"http://\S+/v1", line).group(0)
        assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
        response = httpx.post(f"{url}/completions", json={"prompt": "the", "max_tokens": 3})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

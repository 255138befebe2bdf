"""The OpenAI-compatible app through Starlette's TestClient: shapes, streaming, errors, auth."""

import json

import pytest
from fastapi.testclient import TestClient

from memtool.serve.server import ServerConfig, create_app

URL = "http://127.0.0.1"  # loopback binds accept loopback Host headers only


@pytest.fixture(scope="module")
def client(chat_engine):
    app = create_app(chat_engine, ServerConfig(default_temperature=0.0))
    with TestClient(app, base_url=URL) as client:
        yield client


@pytest.fixture(scope="module")
def plain_client(tiny_engine):
    with TestClient(create_app(tiny_engine), base_url=URL) as client:
        yield client


def _events(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _assert_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert (error["param"], error["code"]) == (param, code)
    return error


def test_health_and_models(client, chat_engine):
    assert client.get("/health").json() == {"status": "ok", "model": chat_engine.model_name}
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [chat_engine.model_name]
    assert client.get(f"/v1/models/{chat_engine.model_name}").json()["id"] == "tiny-chat"
    _assert_error(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_completion_usage_and_text(client, chat_engine):
    prompt = "The film of the year"
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12}).json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == "tiny-chat"
    ids = chat_engine.tokenize(prompt)
    events = list(chat_engine.generate(ids, _greedy(12)))
    assert choice["text"] == "".join(e.text for e in events)
    assert choice["finish_reason"] == events[-1].finish_reason
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(events),
        "total_tokens": len(ids) + len(events),
    }


def _greedy(max_tokens):
    from memtool.serve import GenerationParams

    return GenerationParams(max_tokens=max_tokens)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_equals_non_streaming_for_greedy(client, route):
    request = {"max_tokens": 30, "temperature": 0}
    if route.endswith("chat/completions"):
        request["messages"] = [{"role": "user", "content": "Tell me about the river"}]
    else:
        request["prompt"] = "Tell me about the river"
    whole = client.post(route, json=request).json()
    chunks = _events(
        client.post(
            route, json={**request, "stream": True, "stream_options": {"include_usage": True}}
        )
    )
    assert len({c["id"] for c in chunks}) == 1
    *token_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    choice = whole["choices"][0]
    if "message" in choice:
        assert token_chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in token_chunks)
        assert choice["message"] == {"role": "assistant", "content": streamed}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    else:
        streamed = "".join(c["choices"][0]["text"] for c in token_chunks)
        assert choice["text"] == streamed
    assert [c["choices"][0]["finish_reason"] for c in token_chunks][-1] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])


def test_stop_strings_through_the_api(client):
    request = {"prompt": "The world", "max_tokens": 30}
    text = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    stop = text[5:8]
    cut = client.post("/v1/completions", json={**request, "stop": stop}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"


def test_chat_without_a_template_is_a_clear_400(plain_client):
    response = plain_client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    error = _assert_error(response, 400, "messages", "chat_template_missing")
    assert "no chat template" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ('{"prompt": "x",', None, "not valid JSON"),
        ("[1, 2]", None, "JSON object"),
        ('{"max_tokens": 3}', "prompt", "Field required"),
        ('{"prompt": 42}', "prompt", "valid string"),
        ('{"prompt": "x", "max_tokens": "many"}', "max_tokens", "valid integer"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens", "greater than or equal to 1"),
        ('{"prompt": "x", "temperature": "hot"}', "temperature", "valid number"),
        ('{"prompt": "x", "stream": "yes"}', "stream", "valid boolean"),
        ('{"prompt": "x", "n": 2}', "n", "only n=1"),
        ('{"prompt": "x", "echo": true}', "echo", "not supported"),
        ('{"prompt": "x", "logprobs": 3}', "logprobs", "not supported"),
    ],
)
def test_malformed_requests_get_400(client, body, param, words):
    response = client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    error = _assert_error(response, 400, param)
    assert error["type"] == "invalid_request_error" and words in error["message"]


def test_wrong_types_in_chat_messages(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
    assert "messages.0.content" in _assert_error(response, 400, "messages")["message"]
    response = client.post("/v1/chat/completions", json={"messages": []})
    _assert_error(response, 400, "messages")
    hello = [{"role": "user", "content": "hi"}]
    response = client.post("/v1/chat/completions", json={"messages": hello, "tools": [{}]})
    assert "not supported" in _assert_error(response, 400, "tools")["message"]


def test_unknown_model_is_404(client):
    response = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4o"})
    error = _assert_error(response, 404, "model", "model_not_found")
    assert "gpt-4o" in error["message"] and "tiny-chat" in error["message"]


def test_context_limits(client, chat_engine):
    long_prompt = " ".join(["river"] * 200)  # well over the tiny model's 128 tokens
    response = client.post("/v1/completions", json={"prompt": long_prompt})
    error = _assert_error(response, 400, "prompt", "context_length_exceeded")
    assert "128" in error["message"]
    response = client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 127})
    _assert_error(response, 400, "max_tokens", "context_length_exceeded")
    messages = [{"role": "user", "content": long_prompt}]
    response = client.post("/v1/chat/completions", json={"messages": messages})
    _assert_error(response, 400, "messages", "context_length_exceeded")
    # Without max_tokens the default shrinks to the room left instead of failing.
    words = 10
    while len(chat_engine.tokenize(" ".join(["river"] * (words + 1)))) < 125:
        words += 1
    near_full = " ".join(["river"] * words)
    response = client.post("/v1/completions", json={"prompt": near_full})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["total_tokens"] <= 128 and usage["prompt_tokens"] >= 120


def test_unknown_route_has_the_error_shape(client):
    _assert_error(client.post("/v1/embeddings", json={}), 404)


def test_api_key(chat_engine):
    app = create_app(chat_engine, ServerConfig(api_key="sesame"))
    request = {"prompt": "x", "max_tokens": 2}
    with TestClient(app, base_url=URL) as client:
        _assert_error(client.post("/v1/completions", json=request), 401, None, "invalid_api_key")
        wrong = {"Authorization": "Bearer open"}
        _assert_error(client.get("/v1/models", headers=wrong), 401, None, "invalid_api_key")
        right = {"Authorization": "Bearer sesame"}
        assert client.post("/v1/completions", json=request, headers=right).status_code == 200
        assert client.get("/health").status_code == 200  # liveness needs no key


def test_foreign_host_header_is_refused(client):
    # A page on evil.example resolving its name to 127.0.0.1 (DNS rebinding) sends this Host.
    assert client.get("/v1/models", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200

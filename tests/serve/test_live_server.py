"""A real uvicorn server on a free port: the official OpenAI client, clients that hang up, and
more clients than the queue holds."""

import asyncio
import time

import httpx
import openai
import pytest

from memtool.serve.server import ServerConfig, create_app


def test_official_openai_client(chat_engine, live_server):
    app = create_app(chat_engine, ServerConfig(api_key="sesame", default_temperature=0.0))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-chat"]

        completion = client.completions.create(
            model="tiny-chat", prompt="The river", max_tokens=10, temperature=0
        )
        streamed = client.completions.create(
            model="tiny-chat", prompt="The river", max_tokens=10, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
        assert completion.usage.completion_tokens <= 10

        messages = [{"role": "user", "content": "Tell me about the city"}]
        chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12)
        assert chat.choices[0].message.role == "assistant"
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="tiny-chat", messages=messages, max_tokens=12, stream=True
            )
        ]
        assert "".join(pieces) == chat.choices[0].message.content

        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="gpt-4o", prompt="x")
        assert info.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_client_hanging_up_stops_generation(slow_engine, live_server):
    request = {"prompt": "go", "max_tokens": 2000}  # 40 s of tokens if nothing stopped it
    with live_server(create_app(slow_engine)) as url:
        stream_request = {**request, "stream": True}
        with (
            httpx.Client(base_url=url, timeout=10) as client,
            client.stream("POST", "/v1/completions", json=stream_request) as response,
        ):
            assert next(response.iter_lines()).startswith("data: ")  # then hang up
        assert _wait_for(lambda: slow_engine.closed_early == 1), "the stream kept generating"

        # A non-streaming client that gives up (read timeout) is noticed too.
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.5) as client:
            client.post("/v1/completions", json=request)
        assert _wait_for(lambda: slow_engine.closed_early == 2), "the request kept generating"

        start = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 3})
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == "ab" * 3
        assert time.monotonic() - start < 5
        assert slow_engine.tokens < 200


def test_more_clients_than_the_queue_holds(slow_engine, live_server):
    app = create_app(slow_engine, ServerConfig(max_queue=2))
    request = {"prompt": "go", "max_tokens": 5}

    async def crowd(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            calls = [client.post("/v1/completions", json=request) for _ in range(32)]
            return await asyncio.gather(*calls)

    with live_server(app) as url:
        responses = asyncio.run(crowd(url))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}
        assert statuses.count(200) >= 3  # the running one and the two waiting
        assert statuses.count(503) >= 1
        for r in responses:
            if r.status_code == 200:
                assert r.json()["choices"][0] == {
                    "text": "ab" * 5,
                    "index": 0,
                    "finish_reason": "length",
                    "logprobs": None,
                }
            else:
                error = r.json()["error"]
                assert (error["type"], error["code"]) == ("server_error", "queue_full")
        assert slow_engine.most_running == 1
        after = httpx.post(f"{url}/v1/completions", json=request, timeout=10)
        assert after.status_code == 200
        assert slow_engine.finished == statuses.count(200) + 1

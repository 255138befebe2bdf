"""Serving fixtures: engines over the tiny Llama (with and without a chat template), a slow
scripted engine for queueing and disconnect tests, and a real uvicorn server on a free port."""

import contextlib
import shutil
import threading
import time
from collections.abc import Generator, Iterator

import pytest

from memtool.models import load_model
from memtool.serve import GenerationParams, InMemoryEngine, TokenEvent, plan_max_tokens

# A minimal template in the shape real ones have: turns framed by control tokens, and an open
# assistant turn at the end when asked for.
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_loaded) -> InMemoryEngine:
    """The tiny Llama: context 128 tokens, no chat template."""
    return InMemoryEngine(tiny_loaded)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat"
    shutil.copytree(tiny_llama_dir, folder)
    loaded = load_model(folder)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_engine(tiny_chat_dir) -> InMemoryEngine:
    """The tiny Llama with a chat template."""
    return InMemoryEngine(load_model(tiny_chat_dir))


class SlowEngine:
    """A scripted engine: each token is the text "ab" and takes `delay_s`. It records what a real
    engine would hide: how many streams ran at once, and how each one ended."""

    def __init__(self, delay_s: float = 0.02, context_length: int = 10_000) -> None:
        self.model_name = "slow"
        self.context_length = context_length
        self.delay_s = delay_s
        self.has_chat_template = False
        self._lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.closed_early = 0
        self.finished = 0
        self.tokens = 0

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, token_ids) -> str:
        return "".join(chr(i) for i in token_ids)

    def render_chat(self, messages):
        raise AssertionError("SlowEngine has no chat template")

    def generate(self, prompt_ids, params: GenerationParams, on_token=None) -> Iterator[TokenEvent]:
        budget = plan_max_tokens(params.max_tokens, len(prompt_ids), self.context_length)
        return self._stream(budget)

    def _stream(self, budget: int) -> Generator[TokenEvent, None, None]:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            done = False
            try:
                for index in range(budget):
                    time.sleep(self.delay_s)
                    self.tokens += 1
                    last = index == budget - 1
                    yield TokenEvent(ord("a"), "ab", "length" if last else None)
                done = True
                self.finished += 1
            finally:
                self.running -= 1
                if not done:
                    self.closed_early += 1


@pytest.fixture
def slow_engine() -> SlowEngine:
    return SlowEngine()


@contextlib.contextmanager
def _live(app) -> Iterator[str]:
    import uvicorn

    from memtool.serve.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def live_server():
    """Run an app on a real uvicorn server on a free port: `with live_server(app) as url:`."""
    return _live

"""`memtool serve-local`: one prompt, a terminal chat, or a local OpenAI-compatible server."""

import sys

import typer

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.errors import MemtoolError
from memtool.metrics.memory import peak_rss_bytes
from memtool.models import load_model
from memtool.progress import console
from memtool.serve import (
    ChatSession,
    CompletionResult,
    ContextLengthError,
    GenerationParams,
    InMemoryEngine,
    complete,
)
from memtool.serve.flash.build import ensure_flash_store
from memtool.serve.flash.engine import (
    FlashConfig,
    FlashEngine,
    open_flash_model,
    summarize_tokens,
)
from memtool.sizes import format_size

_EXIT_WORDS = ("/exit", "/quit")


def serve_local_command(
    model: str = typer.Argument(
        None, help="Built-in name, model folder, .gguf file or hub id (default: smollm2-135m)."
    ),
    prompt: str = typer.Option(
        None, "--prompt", help="Continue TEXT, streaming the answer to stdout."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Chat in the terminal with the model's chat template (/exit ends)."
    ),
    port: int = typer.Option(
        None, "--port", help="Serve an OpenAI-compatible API on PORT (0: a free port)."
    ),
    host: str = typer.Option(
        None, "--host", help="With --port: address to bind (default 127.0.0.1: this machine only)."
    ),
    api_key: str = typer.Option(
        None, "--api-key", help="With --port: require 'Authorization: Bearer KEY' on /v1."
    ),
    max_tokens: int = typer.Option(
        None,
        "--max-tokens",
        help="Most tokens per answer (default 256, fewer if the context is shorter); with "
        "--port, for requests that set none.",
    ),
    temperature: float = typer.Option(
        0.0,
        "--temperature",
        help="Sampling temperature, 0 = greedy; with --port, for requests that set none.",
    ),
    max_queue: int = typer.Option(
        None,
        "--max-queue",
        help="With --port: requests that may wait while one generates (default 8); more get 503.",
    ),
    dtype: str = typer.Option(
        "float32",
        "--dtype",
        help="float32, bfloat16 or float16 (in memory; a store keeps its own).",
    ),
    memory_budget: str = typer.Option(
        None,
        "--memory-budget",
        help="Stream FFN neurons from a flash store within SIZE (150MB) or PCT of the weight "
        "bytes (50%); the store is built on first use for built-in models and folders.",
    ),
    window: int = typer.Option(
        None, "--window", help="With --memory-budget: keep neurons of the last K tokens (4)."
    ),
    io_threads: int = typer.Option(
        None, "--io-threads", help="With --memory-budget: parallel reads (16)."
    ),
    sparsity: str = typer.Option(
        None,
        "--sparsity",
        help="With --memory-budget: auto, dense, or a SwiGLU level 0.5-0.9 (auto: 0.5; ReLU "
        "models use their own sparsity).",
    ),
    context: int = typer.Option(
        None,
        "--context",
        help="With --memory-budget: tokens the KV cache is reserved for (default: the model's, "
        "at most 1024 and at most what a quarter of the budget left after the weights holds, "
        "at least 128).",
    ),
    verify_store: bool = typer.Option(
        False,
        "--verify-store",
        help="With --memory-budget: check the whole store against its CRC32s first (reads it "
        "once; the resident part is always checked).",
    ),
    lookahead: bool = typer.Option(
        None,
        "--lookahead/--no-lookahead",
        help="With --memory-budget: read each layer's guessed neurons while its attention "
        "computes (default: off; it did not pay on the disks measured, see BENCHMARKS.md).",
    ),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Generate with a model held in memory: one prompt (--prompt), a chat (--chat), or a local
    OpenAI-compatible server (--port)."""
    chosen = (("--prompt", prompt is not None), ("--chat", chat), ("--port", port is not None))
    modes = [flag for flag, given in chosen if given]

    def action() -> tuple[dict, list[str]]:
        if len(modes) != 1:
            given = f" (got {' and '.join(modes)})" if modes else ""
            raise MemtoolError(f"give exactly one of --prompt TEXT, --chat or --port PORT{given}")
        mode = modes[0]
        if mode != "--port":
            for flag, value in (
                ("--host", host),
                ("--api-key", api_key),
                ("--max-queue", max_queue),
            ):
                if value is not None:
                    raise MemtoolError(f"{flag} applies to --port")
        if json_out and mode != "--prompt":
            raise MemtoolError("--json applies to --prompt")
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature)
        params.validate()
        flash_options = {"--window": window, "--io-threads": io_threads, "--sparsity": sparsity}
        flash_options["--context"] = context
        flash_options["--verify-store"] = verify_store or None
        flash_options["--lookahead/--no-lookahead"] = lookahead
        if memory_budget is None:
            for flag, value in flash_options.items():
                if value is not None:
                    raise MemtoolError(f"{flag} applies to --memory-budget")

        def make_engine():
            if memory_budget is None:
                return InMemoryEngine(load_model(model, dtype=dtype))
            return _flash_engine(
                model, memory_budget, window, io_threads, sparsity, context, verify_store, lookahead
            )

        if mode == "--port":
            return _serve(make_engine, params, host, port, api_key, max_queue)
        engine = make_engine()
        if mode == "--chat":
            return _chat(engine, params)
        result = complete(engine, prompt, params, on_text=None if json_out else _stream_out)
        if not json_out:
            sys.stdout.write("\n")
        payload = _prompt_payload(engine.model_name, result)
        if isinstance(engine, FlashEngine):
            payload["flash"] = engine.flash.describe()
            payload["flash"]["per_token"] = summarize_tokens(engine.token_log)
        return payload, []

    run_command(action, json_out=json_out, debug=debug, render=_render)


def _stream_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # the point of streaming: each piece shows the moment it exists


def _prompt_payload(model: str, result: CompletionResult) -> dict:
    return {
        "model": model,
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "seconds": result.seconds,
        "time_to_first_token_s": result.time_to_first_token_s,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _render(payload: dict) -> None:
    """The answer is on stdout already; the numbers go to stderr, out of its way."""
    if "tokens" in payload:
        console.print(
            f"[dim]{payload['tokens']} tokens ({payload['finish_reason']}) in "
            f"{payload['seconds']:.2f} s: first after {payload['time_to_first_token_s']:.2f} s, "
            f"then {payload['tokens_per_s']:.1f} tokens/s; peak RSS "
            f"{format_size(payload['peak_rss_bytes'])}[/]",
            highlight=False,
            soft_wrap=True,
        )
    per_token = payload.get("flash", {}).get("per_token")
    if per_token:
        console.print(
            f"[dim]per token: {format_size(per_token['bytes_read_per_token'])} read in "
            f"{per_token['reads_per_token']:.0f} reads, "
            f"{per_token['neurons_loaded_per_token']:.0f} neurons loaded, cache hit rate "
            f"{per_token['cache_hit_rate']:.0%}; time "
            f"{per_token['io_seconds_per_token'] * 1e3:.1f} ms I/O + "
            f"{per_token['memory_seconds_per_token'] * 1e3:.1f} ms memory management + "
            f"{per_token['compute_seconds_per_token'] * 1e3:.1f} ms compute[/]",
            highlight=False,
            soft_wrap=True,
        )


def _chat(engine: InMemoryEngine, params: GenerationParams) -> tuple[dict, list[str]]:
    session = ChatSession(engine, params)
    console.print(f"[dim]chatting with {engine.model_name}; /exit or Ctrl-D ends[/]")
    turns = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in _EXIT_WORDS:
            break
        if not line.strip():
            continue
        try:
            result = session.send(line, on_text=_stream_out)
        except ContextLengthError as exc:
            raise MemtoolError(f"the conversation no longer fits the context: {exc}") from exc
        sys.stdout.write("\n")
        turns += 1
        console.print(
            f"[dim]{result.completion_tokens} tokens, {result.tokens_per_s:.1f} tokens/s[/]",
            highlight=False,
            soft_wrap=True,
        )
    return {"model": engine.model_name, "turns": turns}, []


def _flash_engine(
    model, memory_budget, window, io_threads, sparsity, context, verify_store=False, lookahead=None
) -> FlashEngine:
    folder = ensure_flash_store(model)
    config = FlashConfig(
        memory_budget=memory_budget,
        window_tokens=FlashConfig.window_tokens if window is None else window,
        io_threads=io_threads or FlashConfig.io_threads,
        sparsity=sparsity or FlashConfig.sparsity,
        context_tokens=context,
        verify_store=verify_store,
        lookahead=FlashConfig.lookahead if lookahead is None else lookahead,
    )
    flash = open_flash_model(folder, config)
    plan = flash.plan
    direct = "O_DIRECT" if flash.reader.direct else "buffered reads (the page cache is in play)"
    console.print(
        f"[dim]streaming {folder.name}: budget {format_size(plan.budget)} = resident "
        f"{format_size(plan.resident)} + predictors {format_size(plan.predictors)} + KV cache "
        f"{format_size(plan.kv_cache)} ({plan.context_tokens} tokens) + staging "
        f"{format_size(plan.staging)} + windows {format_size(plan.windows)} ({plan.capacity} of "
        f"{plan.n_neurons} neurons per layer); sparsity {flash.sparsity.label}; {direct}, "
        f"reading through gaps up to {format_size(flash.reader.gap_bytes)}"
        f"{'; lookahead on' if config.lookahead else ''}[/]",
        highlight=False,
        soft_wrap=True,
    )
    return FlashEngine(flash)


def _serve(make_engine, params, host, port, api_key, max_queue) -> tuple[dict, list[str]]:
    try:
        from memtool.serve.server import ServerConfig, bind_socket, serve
    except ImportError as exc:
        raise MemtoolError(
            f"the server needs FastAPI and uvicorn ({exc.name} is missing): "
            "pip install 'memtool[serve]'"
        ) from None
    config = ServerConfig(
        host=host or ServerConfig.host,
        port=port,
        api_key=api_key,
        max_queue=ServerConfig.max_queue if max_queue is None else max_queue,
        default_max_tokens=params.max_tokens or ServerConfig.default_max_tokens,
        default_temperature=params.temperature,
    )
    config.validate()
    sock = bind_socket(config.host, config.port)  # before the slow load: a taken port fails now
    engine = make_engine()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    console.print(
        f"serving {engine.model_name} at http://{shown}:{bound_port}/v1 "
        "(OpenAI-compatible; Ctrl-C stops)",
        highlight=False,
        soft_wrap=True,
    )
    serve(engine, config, sock)
    return {"model": engine.model_name}, []

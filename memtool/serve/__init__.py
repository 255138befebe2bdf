"""Local generation and an OpenAI-compatible server over a pluggable generation engine.

`InMemoryEngine` keeps the model in RAM; `memtool.serve.flash.engine.FlashEngine` streams FFN
neurons from a flash store within a memory budget, behind the same `GenerationEngine` protocol.
The HTTP server lives in `memtool.serve.server` (it needs the `serve` extra: FastAPI and
uvicorn), so importing this package does not.
"""

from memtool.serve.engine import (
    DEFAULT_MAX_TOKENS,
    ContextLengthError,
    GenerationEngine,
    GenerationParams,
    InMemoryEngine,
    NoChatTemplateError,
    TokenEvent,
    TokenStats,
    plan_max_tokens,
)
from memtool.serve.session import ChatSession, CompletionResult, complete, generate_text

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ChatSession",
    "CompletionResult",
    "ContextLengthError",
    "GenerationEngine",
    "GenerationParams",
    "InMemoryEngine",
    "NoChatTemplateError",
    "TokenEvent",
    "TokenStats",
    "complete",
    "generate_text",
    "plan_max_tokens",
]

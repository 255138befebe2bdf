"""Local generation without a server: one completion, or a chat that keeps its history.

These are the library calls behind `memtool serve-local --prompt` and `--chat`; they run on any
`GenerationEngine` and report what the answer cost (time to first token, tokens per second).
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from memtool.errors import MemtoolError
from memtool.serve.engine import (
    GenerationEngine,
    GenerationParams,
    NoChatTemplateError,
    TokenStats,
)

TextSink = Callable[[str], None]


@dataclass(frozen=True)
class CompletionResult:
    """One generated answer and what producing it took.

    Attributes:
        text: the answer (stop strings and end-of-sequence tokens left out).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated, the one that ended the answer included.
        finish_reason: "stop" (end of sequence or a stop string) or "length".
        seconds: wall time from the call to the last token.
        time_to_first_token_s: wall time until the first token (reading the prompt included).
        tokens_per_s: generation speed after the first token (the decode rate); for a one-token
            answer, that token's rate.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float
    time_to_first_token_s: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def generate_text(
    engine: GenerationEngine,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    on_text: TextSink | None = None,
) -> CompletionResult:
    """Generate an answer to a tokenized prompt, handing each piece of text to `on_text` as
    soon as it is final.

    Raises:
        ContextLengthError: the prompt, or the prompt plus `params.max_tokens`, does not fit.
    """
    stats: list[TokenStats] = []
    pieces: list[str] = []
    start = time.perf_counter()
    finish_reason = "length"
    for event in engine.generate(prompt_ids, params, on_token=stats.append):
        if event.text:
            pieces.append(event.text)
            if on_text is not None:
                on_text(event.text)
        if event.finish_reason is not None:
            finish_reason = event.finish_reason
    seconds = time.perf_counter() - start
    first = stats[0].seconds
    decode_tokens, decode_s = len(stats) - 1, sum(s.seconds for s in stats[1:])
    rate = decode_tokens / decode_s if decode_tokens and decode_s > 0 else 1 / max(first, 1e-9)
    return CompletionResult(
        text="".join(pieces),
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(stats),
        finish_reason=finish_reason,
        seconds=seconds,
        time_to_first_token_s=first,
        tokens_per_s=rate,
    )


def complete(
    engine: GenerationEngine,
    prompt: str,
    params: GenerationParams | None = None,
    on_text: TextSink | None = None,
) -> CompletionResult:
    """Continue `prompt` (plain text, no chat template).

    Args:
        engine: the engine to run.
        prompt: the text to continue.
        params: how to generate; default greedy, up to `DEFAULT_MAX_TOKENS`.
        on_text: called with each piece of text as it is produced (for streaming to a screen).

    Raises:
        ContextLengthError: the prompt, or the prompt plus `params.max_tokens`, does not fit.
    """
    return generate_text(engine, engine.tokenize(prompt), params or GenerationParams(), on_text)


class ChatSession:
    """A conversation rendered with the model's chat template; each turn sees the whole history.

    Args:
        engine: the engine to run; its tokenizer must have a chat template.
        params: how to generate each answer.
        system: an optional system message opening the conversation.

    Raises:
        NoChatTemplateError: the tokenizer has no chat template.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        params: GenerationParams | None = None,
        system: str | None = None,
    ) -> None:
        if not engine.has_chat_template:
            raise NoChatTemplateError(
                f"model {engine.model_name} has no chat template in its tokenizer, so it cannot "
                "chat: give it a plain prompt instead"
            )
        self.engine = engine
        self.params = params or GenerationParams()
        self.history: list[dict[str, str]] = []
        if system:
            self.history.append({"role": "system", "content": system})

    def send(self, message: str, on_text: TextSink | None = None) -> CompletionResult:
        """Add a user message, generate the assistant's answer and keep both in the history.

        Raises:
            ContextLengthError: the conversation no longer fits the context; the history is left
                as it was, so the caller may drop old turns and retry.
        """
        if not message.strip():
            raise MemtoolError("the message is empty")
        turn = {"role": "user", "content": message}
        prompt_ids = self.engine.render_chat([*self.history, turn])
        result = generate_text(self.engine, prompt_ids, self.params, on_text)
        self.history += [turn, {"role": "assistant", "content": result.text}]
        return result

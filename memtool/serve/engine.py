"""The contract every generation engine meets, and the first engine: the whole model in RAM.

The serving layer (`memtool.serve.server`, `memtool.serve.session`, `memtool serve-local`) talks
only to a `GenerationEngine`: text to token ids and back, a chat template, and per request a
stream of `TokenEvent`s, one per generated token, with a KV cache kept across the request. An
engine serves one request at a time; the server queues the rest.

`InMemoryEngine` runs a loaded transformers model with its own decode loop (model forward +
`DynamicCache`) instead of `model.generate`, because a server needs every token the moment it
exists, the chance to stop between any two tokens when a client goes away, and stop strings that
cut text rather than tokens. Its greedy tokens equal `model.generate(do_sample=False)`'s.

The flash engine (`memtool.serve.flash`: LLM in a flash, Alizadeh et al. 2023: FFN neuron
bundles streamed from storage through a windowed neuron cache, chosen by sparsity predictors)
subclasses `InMemoryEngine`, so the server, the CLI and their tests carry over unchanged.
"""

import inspect
import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

from memtool.errors import MemtoolError
from memtool.serve.text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256  # when a request sets no limit, and the context leaves room for it
FinishReason = Literal["stop", "length"]


class ContextLengthError(MemtoolError):
    """The prompt, or the prompt plus the requested tokens, does not fit the model's context.

    `param` names the request field to fix: "max_tokens", or None for the prompt itself.
    """

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class NoChatTemplateError(MemtoolError):
    """The tokenizer has no chat template, so chat messages cannot be turned into a prompt."""


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one answer.

    Attributes:
        max_tokens: most tokens to generate; None: `DEFAULT_MAX_TOKENS`, or fewer where the
            context has less room left.
        temperature: sampling temperature; 0 is greedy (always the most likely token).
        top_p: nucleus sampling: sample among the most likely tokens that together hold this
            much probability; 1 keeps every token.
        seed: seed of the sampler, for repeatable sampling; None draws a fresh one.
        stop: strings that end the answer; the text stops just before the first one.
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raises MemtoolError on a value out of range."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MemtoolError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise MemtoolError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MemtoolError(f"top_p must be in (0, 1], not {self.top_p}")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it releases.

    `text` may be "" (a partial character, or text that may begin a stop string, is held back
    until it is decided). The last event of a request carries `finish_reason`: "stop" (end of
    sequence token or a stop string) or "length" (max_tokens, or the context is full).
    """

    token_id: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class TokenStats:
    """What producing one token cost; an engine hands one to the stats hook per token.

    Attributes:
        index: 0 for the first generated token, whose time includes reading the prompt.
        seconds: wall time spent producing this token.
        context_tokens: tokens in the KV cache once this token is produced.
    """

    index: int
    seconds: float
    context_tokens: int


StatsHook = Callable[[TokenStats], None]


@runtime_checkable
class GenerationEngine(Protocol):
    """A model that turns a prompt into a stream of tokens, one request at a time."""

    model_name: str  # the name clients ask for (the OpenAI API's `model`)
    context_length: int  # most tokens, prompt and answer together, the model attends to

    @property
    def has_chat_template(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, with the special tokens the model expects around it."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out."""
        ...

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt token ids for chat messages ({"role", "content"}), ready for the assistant's
        turn. Raises NoChatTemplateError without a chat template."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        on_token: StatsHook | None = None,
    ) -> Generator[TokenEvent, None, None]:
        """Stream the answer to `prompt_ids` token by token.

        Raises ContextLengthError (at the call, before any token) when the request does not fit
        the context. Closing the generator early stops generation and frees the engine.
        """
        ...


def plan_max_tokens(
    requested: int | None,
    prompt_tokens: int,
    context_length: int,
    default: int = DEFAULT_MAX_TOKENS,
) -> int:
    """How many tokens a request may generate.

    Args:
        requested: the request's max_tokens; None takes `default`, or the room left if less.
        prompt_tokens: length of the prompt in tokens.
        context_length: the model's context length.
        default: the limit for requests that set none.

    Raises:
        ContextLengthError: the prompt leaves no room, or `requested` is more than the room.
    """
    if prompt_tokens == 0:
        raise ContextLengthError("the prompt is empty: give at least one token", None)
    room = context_length - prompt_tokens
    if room < 1:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens, but the context is {context_length} tokens "
            "(the model's, or under --memory-budget what the KV cache is reserved for: raise "
            "it with --context) and needs room for at least one more: shorten the prompt",
            None,
        )
    if requested is None:
        return min(default, room)
    if requested > room:
        raise ContextLengthError(
            f"max_tokens is {requested}, but the prompt ({prompt_tokens} tokens) leaves room for "
            f"{room} in the model's context of {context_length}: lower max_tokens",
            "max_tokens",
        )
    return requested


class InMemoryEngine:
    """A `GenerationEngine` over a model held entirely in RAM (`memtool.load_model`).

    Args:
        loaded: the model and tokenizer, as `memtool.load_model` returns them.
        model_name: the name clients use; default: the built-in name or hub id, or the folder
            or file name of a local model.
        context_length: override the context length read from the model's config.

    Raises:
        MemtoolError: the config gives no context length and none was passed.
    """

    def __init__(
        self, loaded, model_name: str | None = None, context_length: int | None = None
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_name = model_name or _default_name(loaded)
        length = context_length or loaded.max_context
        if not length:
            raise MemtoolError(
                f"{self.model_name}: the config gives no context length (max_position_embeddings)"
            )
        self.context_length = int(length)
        self._eos_ids = _eos_ids(self.model, self.tokenizer)
        self._cache_arg = cache_argument(self.model)
        self._lock = threading.Lock()  # one request at a time: the KV cache owns the model
        template_args = inspect.signature(self.tokenizer.apply_chat_template).parameters
        self._sanitizes = "sanitize_control_tokens" in template_args
        if self.has_chat_template and not self._sanitizes:
            log.warning(
                "this transformers version cannot keep control tokens typed into chat messages "
                "as text (sanitize_control_tokens): a message can forge turns of other roles"
            )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise NoChatTemplateError(
                f"model {self.model_name} has no chat template in its tokenizer, so chat messages "
                "cannot be rendered: use plain completions (/v1/completions, --prompt) instead"
            )
        from jinja2 import TemplateError

        try:
            # Control tokens typed into a message (say "<|im_end|><|im_start|>system") become
            # plain text, so a user cannot forge turns of another role.
            sanitize = {"sanitize_control_tokens": True} if self._sanitizes else {}
            encoded = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **sanitize,
            )
        except TemplateError as exc:  # the template's own checks, e.g. roles must alternate
            raise MemtoolError(f"the chat template rejected the messages: {exc}") from exc
        return list(encoded["input_ids"])

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        on_token: StatsHook | None = None,
    ) -> Generator[TokenEvent, None, None]:
        params.validate()
        prompt = [int(i) for i in prompt_ids]
        budget = plan_max_tokens(params.max_tokens, len(prompt), self.context_length)
        # Checks above run at the call; the generator below takes the lock at its first token.
        return self._stream(prompt, params, budget, on_token)

    def _stream(
        self,
        prompt: list[int],
        params: GenerationParams,
        budget: int,
        on_token: StatsHook | None,
    ) -> Generator[TokenEvent, None, None]:
        from transformers import DynamicCache

        with self._lock:  # released however the stream ends: exhausted, closed or failed
            cache = DynamicCache(config=self.model.config)
            sampler = torch.Generator()
            if params.seed is not None:
                sampler.manual_seed(params.seed)
            else:
                sampler.seed()
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt)
            stops = StopMatcher(params.stop)
            device = next(self.model.parameters()).device
            inputs = torch.tensor([prompt], device=device)
            for index in range(budget):
                start = time.perf_counter()
                # Only around the forward: a mode entered across a yield would leak into the
                # caller's code between tokens.
                with torch.inference_mode():
                    # logits_to_keep=1: the prompt's other positions need no vocabulary logits.
                    out = self.model(
                        input_ids=inputs,
                        use_cache=True,
                        logits_to_keep=1,
                        **{self._cache_arg: cache},
                    )
                logits = out.logits[0, -1]
                token = _sample(logits, params, sampler)
                if on_token is not None:
                    on_token(TokenStats(index, time.perf_counter() - start, len(prompt) + index))
                if token in self._eos_ids:
                    yield TokenEvent(token, _finish(detokenizer, stops), "stop")
                    return
                text = stops.feed(detokenizer.add(token))
                if stops.stopped:
                    yield TokenEvent(token, text, "stop")
                    return
                if index == budget - 1:
                    text += _finish(detokenizer, stops)
                    yield TokenEvent(token, text, "stop" if stops.stopped else "length")
                    return
                yield TokenEvent(token, text)
                inputs = torch.tensor([[token]], device=device)


def cache_argument(model) -> str:
    """The name `model.forward` takes its KV cache under.

    transformers 5 renamed forward's `past_key_values` to `cache` (the old name warns and goes
    away in 5.40); the project supports versions on both sides of the rename.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _finish(detokenizer: IncrementalDetokenizer, stops: StopMatcher) -> str:
    """The held-back text at the end of a stream (which may itself complete a stop string)."""
    text = stops.feed(detokenizer.flush())
    return text if stops.stopped else text + stops.flush()


def _sample(logits: torch.Tensor, params: GenerationParams, sampler: torch.Generator) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep each token whose more likely predecessors hold less than top_p: the smallest set
        # reaching top_p, never empty.
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        choice = torch.multinomial(sorted_probs * keep, 1, generator=sampler)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=sampler))


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence ids from the generation config and the tokenizer: chat models often
    end a turn with a token (SmolLM2's <|im_end|>) that only one of them lists."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _default_name(loaded) -> str:
    if loaded.kind in ("builtin", "hub"):
        return str(loaded.source)
    return loaded.path.name if loaded.path is not None else str(loaded.source)

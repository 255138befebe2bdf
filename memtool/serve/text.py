"""Turning a stream of token ids into a stream of text: whole characters only, stop strings cut.

Both problems come from the same fact: a token is not a unit of text. A byte-level BPE token can
hold half of a UTF-8 character (an emoji often spans two or three tokens), and a stop string can
start in one token and end in the next. So text is released only once it is known to be final:
complete characters (`IncrementalDetokenizer`) that cannot be the start of a stop string
(`StopMatcher`).

`IncrementalDetokenizer` follows vLLM's `detokenize_incrementally`: decode a short window of
recent tokens and emit the difference to the window's previous decoding. Decoding the window,
rather than the new token alone, keeps SentencePiece's leading-space rules right; decoding only a
window, rather than everything so far, keeps the cost per token constant.
"""

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for bytes that do not form a character (yet)
_PROMPT_CONTEXT_TOKENS = 6  # tokens of the prompt decoded with the first new ones, for spacing


class IncrementalDetokenizer:
    """Decode generated tokens one at a time into text that never splits a character.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with a compatible `decode`).
        prompt_ids: the prompt; its last few tokens give the first generated ones their context
            (a SentencePiece word-start token decodes without its space when alone).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: tokens before it are already emitted
        self._read = len(self._ids)  # tokens before it have been turned into text

    def _decode(self, ids: Sequence[int]) -> str:
        # Spaces are not "cleaned up": that rule looks at neighbouring text, so it would make the
        # streamed pieces differ from decoding the whole answer at once.
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _pending(self) -> tuple[str, str]:
        return (
            self._decode(self._ids[self._prefix : self._read]),
            self._decode(self._ids[self._prefix :]),
        )

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is
        still partial)."""
        self._ids.append(token_id)
        before, after = self._pending()
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back, at the end of generation. Bytes of a character the model
        never finished come out as U+FFFD, as a full decode would give them."""
        before, after = self._pending()
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Cut a text stream at the first stop string, even one spread over several pieces.

    Text that could be the beginning of a stop string is held back until the next piece decides
    it; everything else is released at once.

    Args:
        stops: the stop strings; empty strings are ignored.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add a piece of text; return what can be released. After a stop string matched,
        `stopped` is true and further text is dropped."""
        if self.stopped:
            return ""
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[: min(hits)]
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Release the held text: the stream ended, so it can no longer become a stop string."""
        text, self._held = self._held, ""
        return text

    def _longest_partial_stop(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that a stop string begins with."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest

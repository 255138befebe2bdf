"""Streaming text: whole characters only, and stop strings found across token boundaries."""

from memtool.serve.text import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher


def test_multibyte_characters_are_never_split(tiny_tokenizer):
    # The tiny byte-level BPE saw only ASCII, so each of these characters spans 2-4 tokens.
    text = "Café 🙂 naïve 日本 done"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # several characters really are split over tokens
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, prompt_ids=[])
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert any(p == "" for p in pieces)  # bytes were held back until their character completed
    assert "".join(pieces) == text


def test_pieces_after_a_prompt_join_to_the_full_decode(tiny_tokenizer):
    prompt = tiny_tokenizer("The river of the city", add_special_tokens=False)["input_ids"]
    answer = tiny_tokenizer(" was a world war film", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, prompt)
    streamed = "".join(detokenizer.add(i) for i in answer) + detokenizer.flush()
    assert streamed == tiny_tokenizer.decode(answer)


def test_an_unfinished_character_comes_out_as_replacement_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer("🙂", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, prompt_ids=[])
    assert [detokenizer.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.flush() == REPLACEMENT_CHAR  # what decoding all of it would show too


def test_stop_string_split_over_pieces():
    stops = StopMatcher(["END"])
    assert stops.feed("hello E") == "hello "  # "E" could start END: held
    assert stops.feed("N") == ""
    assert stops.feed("D and more") == ""
    assert stops.stopped


def test_false_start_of_a_stop_string_is_released():
    stops = StopMatcher(["END"])
    assert stops.feed("the EN") == "the "
    assert stops.feed("tire") == "ENtire"
    assert not stops.stopped
    assert stops.feed("EN") == ""
    assert stops.flush() == "EN"  # the stream ended: held text can no longer become END


def test_earliest_of_several_stop_strings_wins():
    stops = StopMatcher(["world", "o w"])
    assert stops.feed("hello world") == "hell"
    assert stops.stopped


def test_no_stop_strings_release_everything():
    stops = StopMatcher([])
    assert stops.feed("abc") == "abc"
    assert stops.flush() == ""

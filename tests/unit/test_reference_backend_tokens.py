"""The reference backend's token rule and deterministic generator, without a server."""

import pytest
from hypothesis import given, settings, strategies as st

from backends.reference import text


def _run(choice: text.Choice) -> list[str]:
    pieces = []
    for _ in range(text.TOKENS_MAX + 1):  # bounded: a choice never yields more than its target
        piece = choice.next_piece()
        if piece is None:
            break
        pieces.append(piece)
    assert choice.done and choice.next_piece() is None
    return pieces


def _choice(target: int = 16, max_tokens: int | None = None, stops: tuple[str, ...] = (),
            index: int = 0, model: str = "ref-chat", prompt: str = "hello", seed: int | None = None
            ) -> text.Choice:
    return text.Choice(text.seed_base(model, prompt, seed), index, target, max_tokens, stops)


# ---- input tokens -------------------------------------------------------------------


def test_chat_prompt_tokens_counts_words_plus_4_per_message_plus_3():
    messages = [
        {"role": "system", "content": "You are  helpful."},  # 3 words
        {"role": "user", "content": [
            {"type": "text", "text": "hi there"},  # 2 words
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},  # counts nothing
            {"type": "text", "text": "again"},  # 1 word
        ]},
        {"role": "assistant", "content": None},
    ]
    assert text.chat_prompt_tokens(messages) == 6 + 4 * 3 + 3


def test_completion_prompt_tokens_counts_words_plus_1():
    assert text.completion_prompt_tokens(["one two\tthree\n"]) == 4
    assert text.completion_prompt_tokens(["a b", "  c "]) == 4
    assert text.completion_prompt_tokens([""]) == 1


_parts = st.lists(st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text()),
    st.just({"type": "image_url", "image_url": {"url": "data:,"}}),
), max_size=4)
_messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.one_of(st.text(), _parts, st.none()),
}), min_size=1, max_size=8)


def _text_bytes(content: object) -> int:
    if isinstance(content, str):
        return len(content.encode("utf-8"))
    return sum(len(p["text"].encode("utf-8")) for p in content or () if p["type"] == "text")


@settings(max_examples=300)
@given(_messages)
def test_chat_prompt_tokens_never_exceed_the_ledgers_worst_case(messages):
    bytes_total = sum(_text_bytes(m["content"]) for m in messages)
    assert text.chat_prompt_tokens(messages) <= bytes_total + 8 * len(messages) + 8


@settings(max_examples=300)
@given(st.lists(st.text(), min_size=1, max_size=8))
def test_completion_prompt_tokens_never_exceed_the_ledgers_worst_case(prompts):
    bytes_total = sum(len(p.encode("utf-8")) for p in prompts)
    assert text.completion_prompt_tokens(prompts) <= bytes_total + 8


# ---- output -------------------------------------------------------------------------


def test_output_is_vocabulary_words_one_per_piece():
    pieces = _run(_choice(target=50))
    assert len(pieces) == 50
    assert not pieces[0].startswith(" ")
    assert all(p.startswith(" ") for p in pieces[1:])
    assert all(p.strip() in text.VOCABULARY for p in pieces)
    assert len("".join(pieces).split()) == 50


def test_same_inputs_give_the_same_text_and_each_input_matters():
    reference = _run(_choice())
    assert _run(_choice()) == reference
    assert _run(_choice(index=1)) != reference
    assert _run(_choice(seed=7)) != reference
    assert _run(_choice(model="ref-chat-large")) != reference
    assert _run(_choice(prompt="hello!")) != reference


def test_a_shorter_answer_is_a_prefix_of_a_longer_one():
    long = _run(_choice(target=200))
    assert _run(_choice(target=30)) == long[:30]
    assert _run(_choice(target=200, max_tokens=70)) == long[:70]


@pytest.mark.parametrize(("target", "max_tokens", "tokens", "reason"), [
    (10, 4, 4, "length"),
    (10, 10, 10, "stop"),
    (10, 20, 10, "stop"),
    (10, None, 10, "stop"),
    (0, 5, 0, "stop"),
    (1, 1, 1, "stop"),
])
def test_max_tokens_caps_the_length_and_sets_finish_reason(target, max_tokens, tokens, reason):
    choice = _choice(target=target, max_tokens=max_tokens)
    assert len(_run(choice)) == tokens
    assert choice.finish_reason == reason


def test_stop_string_cuts_before_its_first_occurrence():
    full = "".join(_run(_choice(target=40)))
    stop = full.split()[5]
    choice = _choice(target=40, stops=(stop,))
    got = "".join(_run(choice))
    assert got == full[:full.index(stop)]
    assert choice.finish_reason == "stop"


def test_stop_string_spanning_pieces_is_found():
    pieces = _run(_choice(target=40))
    stop = pieces[10][-2:] + pieces[11][:3]  # the end of one word and the start of the next
    got = "".join(_run(_choice(target=40, stops=(stop,))))
    full = "".join(pieces)
    assert got == full[:full.index(stop)]


def test_stop_string_never_generated_changes_nothing():
    plain = _run(_choice(target=20, max_tokens=10))
    choice = _choice(target=20, max_tokens=10, stops=("zzz", "###"))
    assert _run(choice) == plain
    assert choice.finish_reason == "length"


@settings(max_examples=200)
@given(st.data())
def test_stop_strings_hold_for_any_substring(data):
    target = data.draw(st.integers(1, 60))
    full = "".join(_run(_choice(target=target)))
    stops = tuple(data.draw(st.lists(
        st.integers(0, len(full) - 1).flatmap(
            lambda start: st.integers(start + 1, min(len(full), start + 12)).map(
                lambda end: full[start:end])),
        min_size=1, max_size=4)))
    choice = _choice(target=target, stops=stops)
    pieces = _run(choice)
    got = "".join(pieces)
    assert all(pieces), "every emitted piece carries text"
    assert full.startswith(got)
    assert not any(stop in got for stop in stops)
    assert any(full[len(got):].startswith(stop) for stop in stops)
    assert choice.finish_reason == "stop"


# ---- directives ---------------------------------------------------------------------


def test_directives_are_read_from_the_text():
    assert text.directives("plain prompt") == (None, None)
    assert text.directives("go [[tokens=1000]] slowly [[delay_ms=5]]") == (1000, 5)
    assert text.directives("[[tokens=0]]") == (0, None)
    assert text.directives(f"[[tokens={text.TOKENS_MAX}]]") == (text.TOKENS_MAX, None)
    assert text.directives("[[tokens=-1]] [[tokens = 3]]") == (None, None)


@pytest.mark.parametrize("prompt", [
    f"[[tokens={text.TOKENS_MAX + 1}]]",
    "[[tokens=999999999]]",
    f"[[delay_ms={text.DELAY_MS_MAX + 1}]]",
])
def test_directives_out_of_range_are_refused(prompt):
    with pytest.raises(ValueError):
        text.directives(prompt)


def test_chat_seed_text_covers_roles_and_text():
    a = [{"role": "user", "content": "hi"}]
    b = [{"role": "system", "content": "hi"}]
    c = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert text.chat_seed_text(a) != text.chat_seed_text(b)
    assert text.chat_seed_text(a) == text.chat_seed_text(c)


@pytest.mark.parametrize("stops", [(), ("zzz",), ("e",)])
@pytest.mark.parametrize("taken", [0, 1, 63, 64, 65, 150])
def test_drain_gives_the_same_pieces_as_next_piece(stops, taken):
    stepwise = _run(_choice(target=200, stops=stops))
    choice = _choice(target=200, stops=stops)
    head = [choice.next_piece() for _ in range(min(taken, len(stepwise)))]
    assert head + choice.drain() == stepwise
    assert choice.done and choice.drain() == []

"""The gateway's tokenizer on the default model (e2e checks it against vLLM's /tokenize)."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

import pytest
import regex

from gateway.tokenize import (
    CHUNK_CHARS,
    FIRST_CHUNK_CHARS,
    GPT2_SPLIT,
    ChatSkeletons,
    PromptTokenizer,
    WordIds,
    _split_pattern,
)

MODEL = Path(__file__).resolve().parents[2] / ".beluga" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    if not MODEL.is_dir():
        pytest.fail(f"the default model is not prepared at {MODEL}: run `make setup`")
    return PromptTokenizer({"m": MODEL})


def test_chat_uses_the_template_with_a_generation_prompt(tok: PromptTokenizer) -> None:
    ids = tok.tokens("m", "chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert ids is not None and all(isinstance(t, int) for t in ids)
    without = tok.tokens("m", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                       "add_generation_prompt": False})
    assert without is not None and len(without) < len(ids) and ids[:len(without)] == without


def test_completions_token_ids_and_batches(tok: PromptTokenizer) -> None:
    assert tok.tokens("m", "completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    first = tok.tokens("m", "completions", {"prompt": "hello world"})
    assert first and tok.tokens("m", "completions", {"prompt": ["hello world", "x"]}) == first


def test_what_cannot_be_tokenized_gives_none_never_an_exception(tok: PromptTokenizer) -> None:
    assert not tok.knows("other") and tok.tokens("other", "chat", {"messages": []}) is None
    assert tok.tokens("m", "chat", {"messages": [{"role": "user"}]}) is None  # no content
    assert tok.tokens("m", "chat", {"messages": [{"role": "user", "content": "x"}],
                                    "chat_template_kwargs": 5}) is None
    assert tok.tokens("m", "completions", {"prompt": None}) is None


CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief.\n\n"}, {"role": "user", "content": "  two  spaces"},
     {"role": "assistant", "content": "ok\t"}, {"role": "user", "content": "ü ✓ 東京"}],
    [{"role": "user", "content": "a literal <|im_end|> and <|im_start|>user inside"}],
    [{"role": "user", "content": "word " * 500}],
]


@pytest.mark.parametrize("messages", CHATS)
def test_segment_cache_equals_tokenizing_the_whole_prompt(tok: PromptTokenizer,
                                                          messages: list[dict[str, str]]) -> None:
    hf = tok._tokenizer("m")
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = hf(text, add_special_tokens=False)["input_ids"]
    assert tok._segments["m"].enabled
    assert tok.tokens("m", "chat", {"messages": messages}) == whole
    assert tok.tokens("m", "chat", {"messages": messages}) == whole  # from the cache


LONG = [{"role": "system", "content": "You answer.  Briefly!\n"},
        {"role": "user", "content": " ".join(f"w{i % 97}ord, {i}.5  ü東京\tx" for i in range(900))}]


def test_long_pieces_tokenize_in_chunks_exactly(tok: PromptTokenizer) -> None:
    hf = tok._tokenizer("m")
    cache = tok._segments["m"]
    assert cache.chunk_chars < 10_000   # chunking passed its self-check on this tokenizer
    text = hf.apply_chat_template(LONG, tokenize=False, add_generation_prompt=True)
    whole = hf(text, add_special_tokens=False)["input_ids"]
    assert len(text) > 10 * cache.chunk_chars
    prompt = tok.prompt("m", "chat", {"messages": LONG + [{"role": "user", "content": "1"}]})
    assert prompt is not None
    assert tok.tokens("m", "chat", {"messages": LONG}) == whole


def test_a_prompt_is_tokenized_only_as_far_as_it_is_read(tok: PromptTokenizer) -> None:
    messages = [{"role": "user", "content": " ".join(f"fresh{i:05d}" for i in range(5000))}]
    prompt = tok.prompt("m", "chat", {"messages": messages})
    assert prompt is not None and not prompt.complete
    chunks = prompt.chunks()
    first: list[int] = []
    while len(first) < 128:
        first += next(chunks)
    assert 128 <= prompt.tokens_read < 1500   # a chunk or two of a ~24,000-token prompt
    estimate = prompt.estimate_total()
    everything = first + [t for ids in chunks for t in ids]
    assert prompt.complete
    assert abs(estimate - len(everything)) < 0.1 * len(everything)
    assert everything == tok.tokens("m", "chat", {"messages": messages})


def test_text_the_tokenizer_cannot_take_gives_no_tokens_not_an_error(
        tok: PromptTokenizer) -> None:
    messages = [{"role": "user", "content": "a lone surrogate \ud800 here"}]
    assert tok.tokens("m", "chat", {"messages": messages}) is None


def test_chunks_start_small_and_grow(tok: PromptTokenizer) -> None:
    """A new prompt is usually read only to its first block key: the first chunk is small
    (one 32-token block and the template), the later ones double up to the cap."""
    cache = tok._segments["m"]
    piece = " ".join(f"fresh{i:05d}" for i in range(3000))
    sizes = [chars for _, chars in cache._chunks(piece)]
    assert FIRST_CHUNK_CHARS <= sizes[0] < 2 * FIRST_CHUNK_CHARS
    assert sizes[1] > sizes[0] and max(sizes) < CHUNK_CHARS + 16
    assert sum(sizes) == len(piece)
    messages = [{"role": "user", "content": piece}]
    prompt = tok.prompt("m", "chat", {"messages": messages})
    assert prompt is not None
    chunks, first = prompt.chunks(), []
    while len(first) < 32:
        first += next(chunks)
    assert prompt.tokens_read < 200   # the template, then one small chunk of ~9,000 tokens


def test_word_cache_is_on_for_the_default_model_and_equals_the_tokenizer(
        tok: PromptTokenizer) -> None:
    hf = tok._tokenizer("m")
    words = tok._segments["m"].words
    assert words is not None   # its self-check passed
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " " * 12 + "\t\n\r"
    for n in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 300)))
        if n % 3 == 0:  # words and contractions, as prose has them
            text = " ".join(rng.choice(["it's", "they'll've", "I'M", "x", "  ", "3.14", "--",
                                        "\n\n", "Hello", " world", "don't"])
                            for _ in range(60))
        assert words.encode(text) == hf(text, add_special_tokens=False)["input_ids"], repr(text)
    assert words.encode("ü is not ASCII") is None
    assert words.encode("a\x0bvertical tab") is None   # \v: classes differ between engines


def test_word_cache_stays_bounded() -> None:
    calls: list[list[str]] = []

    class Enc:
        def __init__(self, word: str) -> None:
            self.ids = [len(word)]

    def encode_batch(batch: list[str], add_special_tokens: bool) -> list[Enc]:
        calls.append(batch)
        return [Enc(w) for w in batch]

    words = WordIds(encode_batch, regex.compile(GPT2_SPLIT), entries=8)
    assert words.encode("one two one three") == [3, 4, 4, 6]
    assert calls == [["one", " two", " one", " three"]]   # one call for a text's misses
    assert words.encode(" one two") == [4, 4] and len(calls) == 1
    for i in range(20):
        words.encode(f"w{i} x{i} y{i}")
        assert len(words._ids) <= 8


@pytest.mark.parametrize(("spec", "want"), [
    ({"normalizer": None, "model": {"type": "BPE"},
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}},
     GPT2_SPLIT),
    ({"normalizer": None, "model": {"type": "BPE"},   # Llama 3, Qwen 2: their own pattern
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": "(?i:'s)|\\p{L}+"}, "behavior": "Isolated",
           "invert": False},
          {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}},
     "(?i:'s)|\\p{L}+"),
    ({"normalizer": {"type": "NFC"}, "model": {"type": "BPE"},
      "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, None),
    ({"normalizer": None, "model": {"type": "BPE"},
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}},
     None),
    ({"normalizer": None, "model": {"type": "Unigram"},
      "pre_tokenizer": {"type": "Metaspace"}}, None),
    ({"normalizer": None, "model": {"type": "BPE"},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Digits", "individual_digits": True},
          {"type": "ByteLevel", "use_regex": True}]}}, None),
])
def test_split_pattern_only_for_byte_level_bpe_it_can_reproduce(
        spec: dict[str, Any], want: str | None) -> None:
    assert _split_pattern(spec) == want


# -- chat templates without the template engine (ChatSkeletons) ----------------------------

def jinja_renderer(template: str) -> Any:
    """A chat template rendered as transformers renders one (a sandboxed, immutable
    environment), for ChatSkeletons."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = ImmutableSandboxedEnvironment(trim_blocks=True,
                                             lstrip_blocks=True).from_string(template)
    renders: list[int] = []

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        renders.append(1)
        return compiled.render(messages=messages, add_generation_prompt=generation)

    render.count = renders  # type: ignore[attr-defined]
    return render


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_skeletons_equal_the_template_on_the_default_model(tok: PromptTokenizer) -> None:
    model_tok = tok._tokenizer("m")
    skeletons = tok._skeletons["m"]
    rng = random.Random(3)
    for chat in [*CHATS, *[[{"role": rng.choice(["system", "user", "assistant"]),
                             "content": "".join(rng.choice(string.printable + "ü東")
                                                for _ in range(rng.randrange(0, 40)))}
                            for _ in range(rng.randrange(1, 5))] for _ in range(50)]]:
        for generation in (True, False):
            want = model_tok.apply_chat_template(chat, tokenize=False,
                                                 add_generation_prompt=generation)
            assert skeletons.render(chat, generation) == want
    assert skeletons.enabled and any(parts for parts in skeletons._shapes.values())


def test_skeletons_render_a_shape_from_what_they_learnt_and_recheck_it() -> None:
    render = jinja_renderer(CHATML)
    skeletons = ChatSkeletons(render, CHATML, recheck_every=4)
    chats = [[{"role": "system", "content": f"s{i}"}, {"role": "user", "content": f"u {i}"}]
             for i in range(9)]
    for chat in chats:
        assert skeletons.render(chat, True) == render(chat, True)
    # learnt once (sentinels) and compared on its first use, then every 4th render
    renders = len(render.count) - 9
    assert renders == 1 + 1 + 2, renders


@pytest.mark.parametrize("template", [
    # contents the template looks into, trims, measures or compares: never a skeleton
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim }}\n{% endfor %}",
    "{% for m in messages %}{% if '</think>' in m['content'] %}{{ m['content'].split("
    "'</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    "{% for m in messages %}{% if m['content'] %}{{ m['content'] }}{% endif %}{% endfor %}",
    "{% for m in messages %}{% if m['content'] == 'x' %}X{% endif %}{{ m['content'] }}"
    "{% endfor %}",
    "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
    "{% for m in messages %}{{ m['content'] | e }}{% endfor %}",
    "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}",
    # a content output twice, or not at all
    "{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}",
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
    "{% endfor %}",
])
def test_templates_that_treat_contents_as_more_than_text_get_no_skeleton(
        template: str) -> None:
    render = jinja_renderer(template)
    skeletons = ChatSkeletons(render, template)
    chat = [{"role": "system", "content": "  a</think>b  "}, {"role": "user", "content": "x"}]
    assert skeletons.render(chat, True) is None
    assert list(skeletons._shapes.values()) == [None]  # learnt as "no skeleton"


def test_skeletons_take_only_plain_messages_and_never_a_clock() -> None:
    render = jinja_renderer(CHATML)
    skeletons = ChatSkeletons(render, CHATML)
    for chat in ([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                 [{"role": "user", "content": "x", "name": "bob"}],
                 [{"role": "user"}], "not a list", [["role", "user"]]):
        assert skeletons.render(chat, True) is None
    assert not skeletons._shapes
    dated = "{{ strftime_now('%d %b %Y') }}" + CHATML
    assert not ChatSkeletons(render, dated).enabled


def test_a_skeleton_that_stops_matching_turns_the_fast_path_off() -> None:
    real = jinja_renderer(CHATML)
    calls = [0]

    def drifting(messages: list[dict[str, str]], generation: bool) -> str:
        calls[0] += 1  # the template's output changes after it was learnt (a clock, say)
        return real(messages, generation) + ("" if calls[0] <= 2 else "!")

    skeletons = ChatSkeletons(drifting, CHATML, recheck_every=2)
    chat = [{"role": "user", "content": "x"}]
    assert skeletons.render(chat, True) == real(chat, True)  # learnt + compared
    assert skeletons.render(chat, True) == real(chat, True)  # from the skeleton
    assert skeletons.render(chat, True) == real(chat, True) + "!"  # recheck: differs
    assert not skeletons.enabled
    assert skeletons.render(chat, True) is None


def test_a_completions_text_is_tokenized_in_chunks_as_far_as_it_is_read(
        tok: PromptTokenizer) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(MODEL)
    text = ("Once upon a time, in 1999, a fox said: <|im_start|> 'hi' \u00fc\u2713  " * 400)
    for add in (True, False):
        payload = {"prompt": text, "add_special_tokens": add}
        assert tok.tokens("m", "completions", payload) == ref(
            text, add_special_tokens=add)["input_ids"]
    prompt = tok.prompt("m", "completions", {"prompt": text * 10})
    assert prompt is not None
    next(prompt.chunks())
    assert prompt.tokens_read < 200  # a first chunk, not the whole text

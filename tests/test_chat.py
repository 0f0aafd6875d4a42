"""Chat templates: SmolLM2's own template and the built-ins give hand-checked prompts; hostile
templates fail with ChatTemplateError, quickly, without allocating much."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgellama.chat import (BUILTIN_TEMPLATES, ChatTemplateError, chat_prompt_ids, end_of_turn_ids,
                            fallback_template, render_chat, template_for)
from tools.fetch_models import SMOLLM2_FILE, cache_dir

SMOLLM2 = cache_dir() / SMOLLM2_FILE  # fetched before collection by conftest.py

# tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf, verbatim
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

SMOLLM2_DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                          "by Hugging Face<|im_end|>\n")

TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + TWO_TURNS


@pytest.fixture(scope="module")
def smollm2_file_template() -> str:
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing: run python tools/fetch_models.py")
    from edgellama.gguf import GGUFFile
    gf = GGUFFile(SMOLLM2)
    try:
        return gf.metadata["tokenizer.chat_template"]
    finally:
        gf.close()


def test_smollm2_template_is_the_files(smollm2_file_template):
    assert smollm2_file_template == SMOLLM2_TEMPLATE


def test_smollm2_two_turns():
    assert render_chat(SMOLLM2_TEMPLATE, TWO_TURNS) == (
        SMOLLM2_DEFAULT_SYSTEM
        + "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_smollm2_two_turns_with_system_no_generation_prompt():
    assert render_chat(SMOLLM2_TEMPLATE, WITH_SYSTEM, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_smollm2_single_message_keeps_whitespace():
    msgs = [{"role": "user", "content": "  two spaces\nand a newline  "}]
    assert render_chat(SMOLLM2_TEMPLATE, msgs) == (
        SMOLLM2_DEFAULT_SYSTEM + "<|im_start|>user\n  two spaces\nand a newline  <|im_end|>\n"
        "<|im_start|>assistant\n")


def test_smollm2_prompt_ids():
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing: run python tools/fetch_models.py")
    from edgellama.tokenizer import Tokenizer
    tok = Tokenizer.from_file(SMOLLM2)
    ids = chat_prompt_ids(tok, TWO_TURNS, SMOLLM2_TEMPLATE)
    assert ids[0] == 1 and ids.count(1) == 5  # <|im_start|> x 5 (system, 3 messages, assistant)
    assert ids.count(2) == 4                  # <|im_end|> x 4
    assert tok.decode(ids, special=True) == render_chat(SMOLLM2_TEMPLATE, TWO_TURNS)
    # message text that spells a special token stays text when it is the *template* that is parsed:
    # the template output is trusted, so callers must not put raw user text into special tokens
    assert template_for(tok, None) == BUILTIN_TEMPLATES["chatml"]
    assert template_for(tok, SMOLLM2_TEMPLATE) == SMOLLM2_TEMPLATE


# ----- built-in fallbacks ---------------------------------------------------------------------------

def test_chatml():
    assert render_chat("chatml", TWO_TURNS) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_chat(None, TWO_TURNS) == render_chat("chatml", TWO_TURNS)


def test_llama2():
    out = render_chat("llama2", WITH_SYSTEM, bos_token="<s>", eos_token="</s>")
    assert out == ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! How can I help? "
                   "</s><s>[INST] What is 2+2? [/INST]")
    assert render_chat("llama2", TWO_TURNS[:1], bos_token="<s>") == "<s>[INST] Hi [/INST]"
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat("llama2", [TWO_TURNS[0], TWO_TURNS[0]])


def test_llama3():
    out = render_chat("llama3", WITH_SYSTEM[:2], bos_token="<|begin_of_text|>")
    assert out == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse."
                   "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_fallback_choice():
    assert fallback_template(["<|im_start|>", "<|im_end|>", "a"]) == "chatml"
    assert fallback_template(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"]) == "llama3"
    assert fallback_template(["<s>", "</s>", "▁the"]) == "llama2"


def test_a_tokenizers_fallback_is_worked_out_once():
    """Every chat request asks for the template; a tokenizer's vocabulary is looked through once
    (each tokenizer its own answer)."""
    class Vocab:
        def __init__(self, texts):
            self.texts, self.n_vocab, self.calls = texts, len(texts), 0

        def token_texts(self):
            self.calls += 1
            return tuple(self.texts)

    chatml, llama2 = Vocab(["<|im_start|>", "<|im_end|>", "a"]), Vocab(["<s>", "</s>"])
    for _ in range(3):
        assert template_for(chatml, None) == template_for(chatml, "") == BUILTIN_TEMPLATES["chatml"]
        assert fallback_template(llama2) == "llama2"
    assert (chatml.calls, llama2.calls) == (1, 1)


def test_llama3_prompt_ids_equal_meta_vectors():
    """The dialog vector of llama-models' test_tokenizer.py (system + user + generation prompt)."""
    from tools.fetch_models import llama3_tokenizer
    try:
        llama3_model = llama3_tokenizer()
    except Exception as e:
        pytest.skip(f"Llama 3's tokenizer.model could not be fetched from PyPI (llama-models): {e}")
    from edgellama.tokenizer import Tokenizer
    tok = Tokenizer.from_file(llama3_model)
    assert template_for(tok, None) == BUILTIN_TEMPLATES["llama3"]
    msgs = [{"role": "system", "content": "This is a test sentence."},
            {"role": "user", "content": "This is a response."}]
    assert chat_prompt_ids(tok, msgs) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]


def test_spm_llama2_prompt_has_one_bos():
    from edgellama.tokenizer import Tokenizer
    tok = Tokenizer.from_file(Path(__file__).parent / "fixtures" / "tokenizer" / "spm_bpe.model")
    assert template_for(tok, "") == BUILTIN_TEMPLATES["llama2"]
    ids = chat_prompt_ids(tok, WITH_SYSTEM)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1  # second turn's <s>, one </s>


# ----- end of turn -------------------------------------------------------------------------------------

def _ids(tok, *texts):
    out = set()
    for text in texts:
        (token,) = tok.encode(text, add_bos=False, special=True)
        out.add(token)
    return frozenset(out)


def test_end_of_turn_of_smollm2_and_the_built_ins():
    """The token each template writes after an assistant message, found from the template alone
    (chat.py knows nothing of the model): <|im_end|> for ChatML and SmolLM2's own template, the
    tokenizer's eos_token for Llama 2, <|eot_id|> for Llama 3; nothing where the template's closing
    text is not one token of the vocabulary (Llama 3's markup in SmolLM2's vocabulary)."""
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} missing: run python tools/fetch_models.py")
    from edgellama.tokenizer import Tokenizer

    tok = Tokenizer.from_file(SMOLLM2)
    im_end = _ids(tok, "<|im_end|>")
    assert end_of_turn_ids(tok, SMOLLM2_TEMPLATE) == im_end == frozenset({2})
    assert end_of_turn_ids(tok, "chatml") == end_of_turn_ids(tok, BUILTIN_TEMPLATES["chatml"]) == im_end
    assert end_of_turn_ids(tok, None) == im_end                 # render_chat's default: chatml
    assert end_of_turn_ids(tok, "llama2") == frozenset({tok.eos_id}) == im_end  # closes with eos_token
    assert end_of_turn_ids(tok, "llama3") == frozenset()
    # plain text after a turn, a template that refuses the probe: no end-of-turn token
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
    assert end_of_turn_ids(tok, plain) == frozenset()
    assert end_of_turn_ids(tok, "{{ raise_exception('no assistant turns') }}") == frozenset()
    # a control token that is not the vocabulary's end of generation still counts
    odd = "{% for m in messages %}{{ m['content'] + '<|im_start|>' }}{% endfor %}"
    assert end_of_turn_ids(tok, odd) == _ids(tok, "<|im_start|>")


def test_end_of_turn_of_llama3_and_llama2_vocabularies():
    from edgellama.tokenizer import Tokenizer

    spm = Tokenizer.from_file(Path(__file__).parent / "fixtures" / "tokenizer" / "spm_bpe.model")
    assert spm.token_text(spm.eos_id) == "</s>"
    assert end_of_turn_ids(spm, "llama2") == frozenset({spm.eos_id})
    assert end_of_turn_ids(spm, "chatml") == frozenset()  # <|im_end|> is no token of this vocabulary
    from tools.fetch_models import llama3_tokenizer
    try:
        llama3_model = llama3_tokenizer()
    except Exception as e:
        pytest.skip(f"Llama 3's tokenizer.model could not be fetched from PyPI (llama-models): {e}")
    llama3 = Tokenizer.from_file(llama3_model)
    assert end_of_turn_ids(llama3, "llama3") == _ids(llama3, "<|eot_id|>") == frozenset({128009})
    assert end_of_turn_ids(llama3, "llama2") == frozenset({llama3.eos_id})  # <|end_of_text|>


# ----- HF conventions ---------------------------------------------------------------------------------

def test_hf_helpers():
    tools = [{"name": "lookup", "description": "<b>find</b> & 'fetch' — ünïcode"}]
    out = render_chat("{{ tools|tojson }}|{{ tools|tojson(indent=2)|length > 10 }}", [], tools=tools)
    assert out.startswith('[{"name": "lookup", "description": "<b>find</b> & \'fetch\' — ünïcode"}]')
    assert render_chat("{{ strftime_now('%Y') }}", [])[:2] in ("20", "21")
    assert render_chat("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                       "{{ m.role }}{% endfor %}", TWO_TURNS) == "user"
    assert render_chat("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
                       "{% endfor %}", TWO_TURNS[:1]) == "Hi"
    # trim_blocks / lstrip_blocks as transformers sets them
    assert render_chat("  {% if true %}\nA\n  {% endif %}\nB", []) == "A\nB"
    assert render_chat("{{ date_string }}", [], date_string="26 Jul 2024") == "26 Jul 2024"
    assert render_chat("{{ documents is none and tools is none }}", []) == "True"


def test_bad_arguments():
    with pytest.raises(ChatTemplateError):
        render_chat("chatml", "hello")  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="message 1"):
        render_chat("chatml", [TWO_TURNS[0], "x"])  # type: ignore[list-item]
    with pytest.raises(ChatTemplateError, match="role"):
        render_chat("chatml", [{"content": "no role"}])
    with pytest.raises(ChatTemplateError):
        render_chat(123, TWO_TURNS)  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="longer than"):
        render_chat("x" * 1_000_001, [])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% for %}", [])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat("chatml", [{"role": "user", "content": None}])


# ----- hostile templates -------------------------------------------------------------------------------

HOSTILE = [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "unsafe"),
    ("{{ joiner.__init__.__globals__ }}", "unsafe"),
    ("{{ namespace.__init__.__globals__ }}", "unsafe"),
    ("{{ messages[0]['content'].__len__() }}", "unsafe"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{% set d = {} %}{{ d.update({'a': 1}) }}", "unsafe"),
    ("{{ messages.__class__.__base__.__subclasses__() }}", "unsafe"),
    ("{{ 'x' * 1000000000 }}", "limit"),
    ("{{ [1] * 1000000000 }}", "limit"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "limit"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = ns.l + ns.l %}"
     "{% endfor %}", "limit"),
    ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('ab', 60) }}",
     "limit"),
    ("{{ 'a'|center(1000000000) }}", "limit"),
    ("{{ 'a'|indent(1000000000) }}", "limit"),
    ("{{ 'a'.ljust(1000000000) }}", "limit"),
    ("{{ 'a'.zfill(1000000000) }}", "limit"),
    ("{{ '%0999999999d' % 1 }}", "limit"),
    ("{{ '%0999999999d'|format(1) }}", "limit"),
    ("{{ '{:>999999999}'.format(1) }}", "limit"),
    ("{{ ('a' * 10000)|replace('a', 'a' * 10000) }}", "limit"),
    ("{{ ('a' * 10000).replace('a', 'a' * 10000) }}", "limit"),
    ("{{ 7 ** 99999999 }}", "too large"),
    ("{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
     "output is longer"),
    ("{% for i in range(1000000000) %}x{% endfor %}", "Range too big"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    ("{{ lipsum(1000000) }}", "undefined"),
    ("{{ raise_exception('no tools allowed') }}", "no tools allowed"),
    ("{{ undefined_function() }}", "undefined"),
]


@pytest.mark.parametrize("template,match", HOSTILE)
def test_hostile_templates_fail_safely(template, match):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(template, TWO_TURNS, timeout=3.0)
    assert time.perf_counter() - t0 < 3.0


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # loops over a list call nothing: the line tracer still sees them
    "{% set xs = range(100000)|list %}{% for i in xs %}{% for j in xs %}{% endfor %}{% endfor %}",
])
def test_slow_templates_time_out(template):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="longer than 0.5 s"):
        render_chat(template, [], timeout=0.5)
    assert time.perf_counter() - t0 < 2.5


def test_unsafe_attribute_reads_as_undefined_not_data():
    # reading (not calling or printing through) an unsafe attribute yields nothing at all
    assert render_chat("{{ ''.__class__ }}", []) == ""
    assert render_chat("{{ raise_exception.__globals__ }}", []) == ""
    assert render_chat("{{ self._TemplateReference__context }}", []) == ""


def test_output_cap():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    msgs = [{"role": "user", "content": "x" * 600}] * 2
    assert len(render_chat(template, msgs, max_output_chars=1200)) == 1200
    with pytest.raises(ChatTemplateError, match="limit of 1199"):
        render_chat(template, msgs, max_output_chars=1199)
    with pytest.raises(ChatTemplateError):
        render_chat(template, msgs, max_output_chars=0)


def test_messages_are_not_mutated():
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ChatTemplateError):
        render_chat("{% set x = messages.pop() %}", msgs)
    assert msgs == [{"role": "user", "content": "Hi"}]
    render_chat("{% set m = messages[0] %}{% set ns = namespace(c=m.content) %}{{ ns.c }}", msgs)
    assert msgs == [{"role": "user", "content": "Hi"}]

"""Chat templates render as transformers' apply_chat_template renders them (turboprefill.chat, render_chat):
SmolLM2's and Gemma 3's real GGUFs, gpt-oss' harmony template, Qwen2.5-VL's; bos_token / eos_token, one BOS,
strftime_now, raise_exception, tojson, loop controls. Expected strings are written out by hand from each
model's documented prompt format."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from turboprefill.chat import chat_text, chat_tokens, normalize_messages
from turboprefill.multimodal import QWEN2VL_CHAT_TEMPLATE, chat_images, render_chat

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
]


def test_render_chat_has_transformers_helpers():
    t = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content | tojson }}"
         "{% endfor %}|{{ strftime_now('%Y') }}|{{ bos_token }}")
    out = render_chat(t, [{"role": "user", "content": "é"}, {"role": "skip", "content": "x"}], bos_token="<s>")
    assert out == f'"é"|{datetime.date.today().year}|<s>'
    with pytest.raises(ValueError, match="the chat template failed: TemplateError: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ValueError, match="SecurityError"):  # the sandbox: no attribute games on str
        render_chat("{{ ''.__class__.__mro__ }}", [])


def test_text_parts_become_one_string_and_images_stay_parts():
    msgs = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]},
                               {"role": "assistant", "content": None}])
    assert msgs == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}]
    img = [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "q"}]
    assert normalize_messages([{"role": "user", "content": img}])[0]["content"] == img
    for bad in ([], [{"content": "x"}], [{"role": "user", "content": 3}], "hi"):
        with pytest.raises(ValueError):
            normalize_messages(bad)


def test_data_url_images_are_decoded():
    import base64

    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG...").decode()
    assert chat_images([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]) == [
        b"\x89PNG..."]
    with pytest.raises(ValueError, match="not valid base64"):
        bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
        chat_images([{"role": "user", "content": [bad]}])
    with pytest.raises(ValueError, match="only local paths"):
        chat_images([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}])


def test_qwen2vl_template():
    msgs = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]}]
    assert render_chat(QWEN2VL_CHAT_TEMPLATE, msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    assert render_chat(QWEN2VL_CHAT_TEMPLATE, msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n")


@pytest.mark.realmodel
def test_smollm2_gguf_template(smollm2_path):
    from turboprefill import Engine

    with Engine(smollm2_path, threads=1, n_ctx=256) as eng:
        assert eng.chat_template and "<|im_start|>" in eng.chat_template
        assert chat_text(eng, CONVERSATION) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
        # no system message: the template's own default
        assert chat_text(eng, CONVERSATION[1:2]).startswith(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
        ids = chat_tokens(eng, CONVERSATION)
        tok = eng.tokenizer
        assert ids[0] == tok.token_id("<|im_start|>") and ids.count(tok.token_id("<|im_end|>")) == 4


@pytest.mark.realmodel
def test_gemma3_template_and_one_bos(gemma3_path):
    from turboprefill import Engine

    with Engine(gemma3_path, threads=1, n_ctx=256) as eng:
        # the PyPI file has no template: Gemma 3's own is used
        assert chat_text(eng, CONVERSATION) == (
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
            "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
        ids = chat_tokens(eng, CONVERSATION)
        tok = eng.tokenizer
        assert ids[:2] == [tok.bos_id, tok.token_id("<start_of_turn>")] and ids.count(tok.bos_id) == 1
        assert tok.token_id("<end_of_turn>") in tok.eog_ids
        with pytest.raises(ValueError, match="roles must alternate"):
            chat_text(eng, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def _llama_cpp_template(name: str) -> str:
    """A template from llama.cpp's models/templates (TP_LLAMA_CPP_SRC: a llama.cpp source tree, e.g. the
    vendor/llama.cpp of `pip download --no-binary :all: --no-deps llama-cpp-python`)."""
    src = os.environ.get("TP_LLAMA_CPP_SRC")
    path = Path(src or "", "models", "templates", name)
    if not src or not path.is_file():
        pytest.skip(f"needs llama.cpp's models/templates/{name}: set TP_LLAMA_CPP_SRC to a llama.cpp source tree "
                    "(the published template text is not copied into this repository)")
    return path.read_text()


class _Tok:
    bos_id, eos_id, tokens = 0, 1, ["<|startoftext|>", "<|return|>"]


class _TemplateOnly:
    """What chat_text reads from an Engine: a template and a tokenizer's BOS/EOS texts."""

    def __init__(self, template):
        self.chat_template, self.tokenizer, self.config = template, _Tok(), {"architecture": "gpt-oss"}


def test_gpt_oss_harmony_template():
    eng = _TemplateOnly(_llama_cpp_template("openai-gpt-oss-120b.jinja"))
    today = datetime.date.today().isoformat()
    system = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
              f"Knowledge cutoff: 2024-06\nCurrent date: {today}\n\nReasoning: {{}}\n\n"
              "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")
    assert chat_text(eng, CONVERSATION) == (
        system.format("medium") + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
        "<|start|>user<|message|>Why?<|end|><|start|>assistant")
    assert chat_text(eng, CONVERSATION[1:2], reasoning_effort="low") == (
        system.format("low") + "<|start|>user<|message|>Hi<|end|><|start|>assistant")
    with pytest.raises(ValueError, match="<\\|channel\\|> tags"):
        chat_text(eng, [{"role": "user", "content": "a"},
                        {"role": "assistant", "content": "<|channel|>final<|message|>x"}])

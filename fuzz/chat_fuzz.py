"""Atheris fuzzer: the chat-template renderer (multimodal.render_chat) and chat image extraction.

A GGUF's tokenizer.chat_template is text from the internet that the engine executes (sandboxed jinja2). One
input = a template and a few chat messages cut from the fuzzer's bytes. The only allowed failure is
ValueError with a message (a template that does not compile, raises, or touches what the sandbox forbids);
anything else — a crash, another exception type, a non-str result — is a finding. Seeds: fuzz/corpus/chat
(real templates: Qwen2-VL's and shapes of ChatML, Llama 3 and Gemma). Run: fuzz/run.sh chat SECONDS.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["turboprefill.multimodal"]):
    from turboprefill import multimodal as mm

ROLES = ("system", "user", "assistant", "tool", "")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    template = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 4096))
    messages = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        role = ROLES[fdp.ConsumeIntInRange(0, len(ROLES) - 1)]
        if fdp.ConsumeBool():
            content = fdp.ConsumeUnicodeNoSurrogates(64)
        else:
            content = [{"type": "image", "image": "a.png"} if fdp.ConsumeBool()
                       else {"type": "text", "text": fdp.ConsumeUnicodeNoSurrogates(32)}
                       for _ in range(fdp.ConsumeIntInRange(0, 3))]
        messages.append({"role": role, "content": content})
    try:
        out = mm.render_chat(template, messages, add_generation_prompt=fdp.ConsumeBool())
    except ValueError as e:
        if not str(e):
            raise AssertionError("a failed template must say why") from e
        return
    if not isinstance(out, str):
        raise AssertionError(f"render_chat returned {type(out).__name__}")
    if len(mm.chat_images(messages)) != sum(isinstance(m["content"], list) and
                                            sum(p.get("type") == "image" for p in m["content"]) for m in messages):
        raise AssertionError("chat_images lost or invented an image")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

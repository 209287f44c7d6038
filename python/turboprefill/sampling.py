"""sampling.py — from one step's logits to the next token, and from tokens to text that is safe to stream.

Owns: the sampling parameters and their validation (SamplingParams), the per-request sampler (Sampler), the
incremental detokenizer with stop strings (TextStream) and the request's generation state (Generation), which
the Python chat API and the server both drive one token at a time. Nothing here calls the engine.

The rules, and where they come from:
- Order (llama.cpp's default sampler chain): penalties, then top_k, top_p and min_p on the softmax of the
  penalized logits, then temperature over the survivors, then one draw. Temperature 0 is greedy: the argmax
  of the penalized logits, so with no penalties it is exactly Engine.generate's token.
- repeat_penalty (llama.cpp's): over the distinct tokens of the last repeat_last_n tokens (prompt included,
  as llama.cpp's server feeds the prompt to its sampler), a positive logit is divided by the penalty and a
  negative one multiplied.
- presence_penalty / frequency_penalty (OpenAI's formula): logit -= count * frequency + (count > 0) * presence,
  counting the tokens generated so far (not the prompt).
- logprobs: log-softmax of the model's raw logits, before penalties, temperature and truncation — what
  llama.cpp's server (post_sampling_probs off) and vLLM (raw logprobs) report: the model's own belief in each
  token, the same whatever the sampling settings.
- Stop: end-of-generation token ids (the vocabulary's EOS/EOT set, plus stop_token_ids) end a request without
  adding text; a stop string ends it before the string. Text that could still become a stop string, and bytes
  of an unfinished UTF-8 character, are held back, so a stream never shows part of a stop string.
"""

from __future__ import annotations

import codecs
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; more only costs a longer scan)
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class SamplingError(ValueError):
    """A sampling parameter outside its range; `field` names the parameter (the server's 400 `param`)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _number(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SamplingError(name, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise SamplingError(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _int(name: str, v, lo: int, hi: int | None = None, none_ok: bool = False) -> int | None:
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise SamplingError(name, f"must be an integer >= {lo}{'' if hi is None else f' and <= {hi}'}, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise SamplingError(name, f"must be in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return int(v)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Defaults are OpenAI's (temperature 1, top_p 1, no penalties) plus llama.cpp's
    repeat_last_n; every filter at its default is off. max_tokens None: until an end token or the context ends."""

    temperature: float = 1.0  # [0, 2]; 0 = greedy
    top_k: int = 0  # >= 0; 0 = off
    top_p: float = 1.0  # [0, 1]; 1 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    seed: int | None = None  # None: a fresh random seed
    repeat_penalty: float = 1.0  # (0, 10]; 1 = off
    repeat_last_n: int = 64  # tokens the repeat penalty looks back over
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    max_tokens: int | None = None  # >= 1
    stop: tuple[str, ...] = ()  # up to MAX_STOP non-empty strings
    stop_token_ids: tuple[int, ...] = ()  # besides the vocabulary's end-of-generation ids
    ignore_eos: bool = False  # do not stop at end-of-generation ids (benchmarks)
    logprobs: bool = False
    top_logprobs: int = 0  # [0, 20] alternatives per token (with logprobs)

    def __post_init__(self):
        s = object.__setattr__
        s(self, "temperature", _number("temperature", self.temperature, 0.0, 2.0))
        s(self, "top_k", _int("top_k", self.top_k, 0))
        s(self, "top_p", _number("top_p", self.top_p, 0.0, 1.0))
        s(self, "min_p", _number("min_p", self.min_p, 0.0, 1.0))
        s(self, "seed", _int("seed", self.seed, -(2**63), 2**64 - 1, none_ok=True))
        s(self, "repeat_penalty", _number("repeat_penalty", self.repeat_penalty, 0.0, 10.0, lo_open=True))
        s(self, "repeat_last_n", _int("repeat_last_n", self.repeat_last_n, 0))
        s(self, "presence_penalty", _number("presence_penalty", self.presence_penalty, -2.0, 2.0))
        s(self, "frequency_penalty", _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        s(self, "max_tokens", _int("max_tokens", self.max_tokens, 1, none_ok=True))
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            raise SamplingError("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        if len(stop) > MAX_STOP:
            raise SamplingError("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
        s(self, "stop", tuple(stop))
        ids = self.stop_token_ids or ()
        s(self, "stop_token_ids", tuple(_int("stop_token_ids", i, 0) for i in ids))
        if not isinstance(self.logprobs, bool):
            raise SamplingError("logprobs", f"must be true or false, got {self.logprobs!r}")
        s(self, "top_logprobs", _int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS))
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs", "needs logprobs=true")


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class Sampler:
    """One request's sampler: its random generator and the token history the penalties look at."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = ()):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(list(prompt)[-params.repeat_last_n:] if params.repeat_last_n else [],
                                        maxlen=params.repeat_last_n)
        self.generated: Counter[int] = Counter()

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """The logits after the repeat, presence and frequency penalties (the input when all are off)."""
        p = self.p
        out = logits
        if p.repeat_penalty != 1.0 and self.recent:
            ids = np.fromiter(set(self.recent), dtype=np.int64)
            out = out.copy()
            v = out[ids]
            out[ids] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.generated:
            if out is logits:
                out = out.copy()
            ids = np.fromiter(self.generated.keys(), dtype=np.int64)
            counts = np.fromiter(self.generated.values(), dtype=np.float64)
            out[ids] -= (counts * p.frequency_penalty + p.presence_penalty).astype(out.dtype)
        return out

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) that survive top_k, top_p and min_p, most likely first, with the temperature
        applied to their logits. Needs temperature > 0."""
        p = self.p
        n = logits.size
        if p.top_k and p.top_k < n:
            ids = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
        else:
            ids = np.arange(n)
        x = logits[ids].astype(np.float64)
        order = np.argsort(-x, kind="stable")
        ids, x = ids[order], x[order]
        if p.top_p < 1.0 or p.min_p > 0.0:
            prob = np.exp(x - x[0])
            prob /= prob.sum()
            keep = ids.size
            if p.top_p < 1.0:
                # the smallest head whose mass reaches top_p (at least one token), as llama.cpp
                keep = min(keep, int(np.searchsorted(np.cumsum(prob), p.top_p)) + 1)
            if p.min_p > 0.0:
                keep = min(keep, max(1, int(np.count_nonzero(prob >= p.min_p * prob[0]))))
            ids, x = ids[:keep], x[:keep]
        x = x / p.temperature
        prob = np.exp(x - x[0])
        return ids, prob / prob.sum()

    def sample(self, logits: np.ndarray) -> int:
        """The next token from one position's logits (float32 [n_vocab]); does not record it (accept() does)."""
        z = self.penalize(logits)
        if self.p.temperature == 0.0:
            return int(np.argmax(z))
        ids, prob = self.candidates(z)
        k = int(np.searchsorted(np.cumsum(prob), self.rng.random() * prob.sum(), side="right"))
        return int(ids[min(k, ids.size - 1)])

    def accept(self, token: int) -> None:
        self.recent.append(token)
        self.generated[token] += 1

    def logprob(self, logits: np.ndarray, token: int) -> TokenLogprob:
        lp = log_softmax(logits)
        k = self.p.top_logprobs
        top: list[tuple[int, float]] = []
        if k:
            ids = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
            ids = ids[np.argsort(-lp[ids], kind="stable")]
            top = [(int(i), float(lp[i])) for i in ids]
        return TokenLogprob(int(token), float(lp[token]), top)


class TextStream:
    """Token pieces in, text that is safe to show out: whole UTF-8 characters, never part of a stop string."""

    def __init__(self, stop: Iterable[str] = ()):
        self.stop = tuple(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not shown yet: it may begin a stop string
        self.stopped_by: str | None = None

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that can be shown now ("" while a stop string is pending).
        After a stop string is found, stopped_by names it and the text before it is returned."""
        self._held += self._utf8.decode(piece)
        if not self.stop:
            out, self._held = self._held, ""
            return out
        hit = min(((self._held.find(s), s) for s in self.stop if s in self._held), default=None)
        if hit is not None:
            at, self.stopped_by = hit
            out, self._held = self._held[:at], ""
            return out
        # hold back the longest tail that is a prefix of some stop string
        keep = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def flush(self) -> str:
        """At the end of a request that no stop string ended: the held text (an unfinished character as U+FFFD)."""
        out = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return out


@dataclass
class Step:
    """What one sampled token did to a request."""

    token: int
    text: str  # new text to show ("" while held back)
    finish_reason: str | None  # None: goes on; "stop" (end token or stop string) or "length"
    logprob: TokenLogprob | None = None
    text_bytes: bytes = b""  # the token's own bytes (for logprobs' `bytes` and `token`)


@dataclass
class Generation:
    """One request's generation: sampler, stream and limits. push() takes the logits of the request's last
    position and returns the Step; the caller feeds step.token to the engine while finish_reason is None."""

    tokenizer: object
    params: SamplingParams
    prompt: Sequence[int]
    n_ctx: int  # the sequence's context: generation stops with "length" when it is full
    n_prompt: int = -1  # positions the prompt takes (image rows included); -1: len(prompt)
    sampler: Sampler = field(init=False)
    stream: TextStream = field(init=False)
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self):
        if self.n_prompt < 0:
            self.n_prompt = len(self.prompt)
        self.sampler = Sampler(self.params, self.prompt)
        self.stream = TextStream(self.params.stop)
        eog = set() if self.params.ignore_eos else set(getattr(self.tokenizer, "eog_ids", ()))
        self.end_ids = frozenset(eog | set(self.params.stop_token_ids))

    def push(self, logits: np.ndarray) -> Step:
        if self.finish_reason is not None:
            raise RuntimeError("push() after the generation finished")
        tok = self.sampler.sample(logits)
        self.sampler.accept(tok)
        self.tokens.append(tok)
        lp = self.sampler.logprob(logits, tok) if self.params.logprobs else None
        raw = self.tokenizer.piece(tok)
        if tok in self.end_ids:
            return self._finish(Step(tok, "", "stop", lp, raw), self.stream.flush())
        text = self.stream.push(raw)
        if self.stream.stopped_by is not None:
            return self._finish(Step(tok, "", "stop", lp, raw), text)
        full = self.n_prompt + len(self.tokens) >= self.n_ctx
        if full or (self.params.max_tokens is not None and len(self.tokens) >= self.params.max_tokens):
            return self._finish(Step(tok, "", "length", lp, raw), text + self.stream.flush())
        self.text.append(text)
        return Step(tok, text, None, lp, raw)

    def _finish(self, step: Step, text: str) -> Step:
        self.finish_reason = step.finish_reason
        step.text = text
        self.text.append(text)
        return step

    @property
    def output(self) -> str:
        return "".join(self.text)

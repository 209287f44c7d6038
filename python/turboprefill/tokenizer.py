"""Text <-> token ids, built only from a GGUF's ``tokenizer.ggml.*`` metadata, reproducing llama.cpp's ids.

Owns: the two vocabulary kinds our models use and llama.cpp's rules around them.

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (SmolLM2). HF ``tokenizers`` runs the BPE from the
  GGUF's ``tokens`` + ``merges``; the pre-tokenizer is the chain of split regexes llama.cpp uses for the
  file's ``tokenizer.ggml.pre`` (each regex splits every piece again, matches and gaps both kept, i.e.
  HF ``Split(..., "isolated")``), then ByteLevel without its own regex.
- ``tokenizer.ggml.model == "llama"``: SentencePiece-style vocabulary (Gemma 3). llama.cpp's SPM
  tokenizer is SentencePiece's BPE algorithm (merge the adjacent pair whose joined piece has the highest
  score, leftmost first, unknown characters as ``<0xXX>`` bytes), so a ``sentencepiece`` ModelProto is
  written straight from ``tokens``/``scores``/``token_type`` (with sentencepiece's own
  ``sentencepiece_model_pb2``) with normalization switched off; we escape ' ' as U+2581 and add
  llama.cpp's optional space prefix ourselves.

Shared by both, done here in Python exactly as llama.cpp's ``tokenizer_st_partition`` does it: before any
BPE, the text is cut at every occurrence of a user-defined token (and, with ``special=True``, of control
and unknown tokens too), longest token text first, each occurrence left to right. Gemma relies on this:
its runs of spaces, newlines and tabs and some HTML tags are user-defined tokens that must be cut out of
the *raw* text (SentencePiece would see spaces only after escaping them).

Token kinds follow llama.cpp's attributes, not only the GGUF's ``token_type``: at load llama.cpp marks
tokens whose *text* is on its end-of-generation / FIM lists as control (e.g. Gemma 3's user-defined ``</s>``
then stays plain text unless ``special=True``); the same lists are applied here (``_llama_cpp_attrs``).
Not reproduced: name-based LSTRIP/RSTRIP flags (phi-3, jina, modern-bert) and the ``clean_spaces``
post-processing of ``llama_detokenize`` for gpt2 vocabularies other than smollm/qwen2.

Every non-byte piece is entered in the ModelProto as NORMAL, control and user-defined ones included,
because llama.cpp's SPM merges into any token whose text exists in the vocabulary; only ``<unk>`` (which
SentencePiece requires) and the ``<0xXX>`` byte pieces keep their own types.

Decoding concatenates each token's bytes (byte-level inverse map for gpt2, U+2581 -> ' ' and byte pieces for
llama; control tokens are dropped unless ``special=True``) and decodes UTF-8 with replacement, which is what
llama.cpp's ``llama_detokenize`` does for vocabularies that do not clean up spaces (ours).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

# llama_token_type in the GGUF's tokenizer.ggml.token_type
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama_token_attr bits (llama.h); a token's behaviour is decided by these, as in llama.cpp
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1, 2, 4, 8, 16, 32
_TYPE_TO_ATTR = {
    TOKEN_NORMAL: ATTR_NORMAL,
    TOKEN_UNKNOWN: ATTR_UNKNOWN,
    TOKEN_CONTROL: ATTR_CONTROL,
    TOKEN_USER_DEFINED: ATTR_USER_DEFINED,
    TOKEN_UNUSED: ATTR_UNUSED,
    TOKEN_BYTE: ATTR_BYTE,
}

# Texts llama.cpp (src/llama-vocab.cpp, load) treats as end-of-generation and forces to control.
_EOG_TEXTS = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
}
# FIM texts, forced to control when the GGUF does not name that FIM token by id.
_FIM_TEXTS = {
    "fim_pre": {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>", "<|prefix|>"},
    "fim_suf": {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>", "<|suffix|>"},
    "fim_mid": {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>", "<|middle|>"},
    "fim_pad": {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"},
    "fim_rep": {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"},
    "fim_sep": {"<|file_sep|>"},
}
# gpt-oss: always rendered, cut out as user-defined
_FORCE_USER_DEFINED = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}

# llama.cpp (src/llama-vocab.cpp, llm_tokenizer_bpe) split regexes per pre-tokenizer family. Applied in
# order; every regex re-splits every piece produced so far.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-oss, GPT-4o) as llama.cpp runs it: the tokenizer.json regex with \p{Lu}/\p{Ll}-style classes
# rewritten as "a letter that is not a-z / not A-Z", because llama.cpp matches on text whose non-ASCII
# letters are collapsed into one placeholder (so a non-ASCII letter counts as both upper and lower case).
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_PRE: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for an unnamed BPE pre-tokenizer
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "gpt-2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    # one digit per piece, then GPT-2
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "command-r": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
    "exaone": (r"\p{N}", _GPT2),
    "minerva-7b": (r"\p{N}", _GPT2),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "pixtral": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "megrez": (_QWEN2,),
    "gpt-4o": (_GPT4O,),
    "llama4": (_GPT4O,),
    "kanana2": (_GPT4O,),
    "talkie": (_GPT4O,),
}
# llama.cpp sets ignore_merges for the Llama-3 family: a pre-token that is itself a vocabulary entry is
# emitted whole, without running the merges.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"}
# Pre-tokenizers for which llama.cpp switches add_bos on when the GGUF does not say.
_ADD_BOS_DEFAULT = _IGNORE_MERGES

_SPIECE_SPACE = "\u2581"


def _llama_cpp_attrs(tokens: Sequence[str], types: Sequence[int], md: Mapping[str, object]) -> list[int]:
    """Per-token llama_token_attr after llama.cpp's text-based fix-ups of the GGUF's token types."""
    attrs = [_TYPE_TO_ATTR.get(t, 0) for t in types]
    index = {t: i for i, t in enumerate(tokens)}  # last id wins, like llama.cpp's token_to_id
    for kind, texts in _FIM_TEXTS.items():
        if f"tokenizer.ggml.{kind}_token_id" in md:
            continue
        for t in texts & index.keys():
            attrs[index[t]] |= ATTR_CONTROL
    eog = _EOG_TEXTS & index.keys()
    for t in eog:
        attrs[index[t]] |= ATTR_CONTROL
    for t in _FORCE_USER_DEFINED & index.keys():
        attrs[index[t]] = ATTR_USER_DEFINED
    # gpt-oss / solar-open: "<|end|>" is not end-of-generation there and goes back to user-defined
    if "<|end|>" in eog and (
        {"<|return|>", "<|call|>"} <= eog or ("<|flush|>" in eog and eog & {"<|call|>", "<|calls|>"})
    ):
        attrs[index["<|end|>"]] = ATTR_USER_DEFINED
    # gemma4 / paddleocr: "</s>" is ordinary text when "<|tool_response>" exists
    if {"</s>", "<|tool_response>"} <= eog:
        attrs[index["</s>"]] = ATTR_NORMAL
    return attrs


def _check_array(md: Mapping[str, object], key: str, kind: type) -> None:
    """ValueError unless md[key] (when present) is an array of `kind` (a fuzzed file had integer merges)."""
    v = md.get(key)
    if v is None:
        return
    if not isinstance(v, list) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
        raise ValueError(f"GGUF key {key} must be an array of {'strings' if kind is str else 'integers'}")


def _gpt2_byte_map() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _spm_model_proto(
    pieces: Sequence[bytes], scores: Sequence[float], types: Sequence[int], unk_id: int
) -> bytes:
    """Serialized sentencepiece ModelProto (BPE, byte fallback, no normalization), built with the
    ``sentencepiece_model_pb2`` module that the sentencepiece package ships.

    A protobuf ``string`` field holds only valid UTF-8, but a GGUF token may be any bytes. Such a piece can
    never be matched: the text SentencePiece sees is a Python str (valid UTF-8) and BPE only ever joins
    pieces it has already matched. It is entered under a placeholder that is just as unreachable (it
    contains U+0020, which ``encode`` always escapes to U+2581 first) so that ids keep their positions;
    decoding never asks SentencePiece, it uses the GGUF's own bytes.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    sp_piece = spm_pb2.ModelProto.SentencePiece
    # Every non-byte piece is NORMAL (see the module docstring); exactly one is UNKNOWN.
    sp_type = {TOKEN_BYTE: sp_piece.BYTE, TOKEN_UNKNOWN: sp_piece.UNKNOWN}
    taken = None  # the set of piece texts, built only when a placeholder is needed
    m = spm_pb2.ModelProto()
    add = m.pieces.add  # ~0.3 s for Gemma's 262144 pieces; building messages, then extend(): ~3x slower
    for i, (raw, score, t) in enumerate(zip(pieces, scores, types)):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            if taken is None:
                taken = {p.decode("utf-8", "surrogateescape") for p in pieces}
            text = f"<invalid utf-8 {i}> "
            while text in taken:  # a GGUF piece could spell the same text; placeholders must be unique
                text += " "
            taken.add(text)
        add(piece=text, score=score, type=sp_type.get(t, sp_piece.NORMAL))
    m.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = unk_id
    # -1: SentencePiece must not treat any piece as BOS/EOS/PAD; we add BOS ourselves.
    m.trainer_spec.bos_id = m.trainer_spec.eos_id = m.trainer_spec.pad_id = -1
    # Text arrives already escaped (' ' -> U+2581) and with llama.cpp's space prefix when it wants one.
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = False
    return m.SerializeToString()


class Tokenizer:
    """A GGUF vocabulary that tokenizes like llama.cpp's ``llama_tokenize``.

    Build it with :meth:`from_metadata` (the ``metadata`` dict of ``describe_gguf``) or :meth:`from_gguf`.
    """

    def __init__(self, md: Mapping[str, object]):
        self.model = str(md.get("tokenizer.ggml.model", ""))
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: the file carries no vocabulary")
        _check_array(md, "tokenizer.ggml.tokens", str)
        if self.model not in ("gpt2", "llama"):
            raise ValueError(
                f"unsupported tokenizer.ggml.model {self.model!r}: TurboPrefill tokenizes 'gpt2' (byte-level "
                "BPE) and 'llama' (SentencePiece-style) vocabularies; tokenize with another tool and pass ids"
            )
        self.pre = str(md.get("tokenizer.ggml.pre", "default") or "default")
        # llama.cpp renames an empty token text so that text -> id stays a bijection
        self.tokens: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(self.tokens)
        types = md.get("tokenizer.ggml.token_type")
        _check_array(md, "tokenizer.ggml.token_type", int)
        self.token_types: list[int] = list(types) if types is not None else [TOKEN_NORMAL] * n
        if len(self.token_types) != n:
            raise ValueError(f"tokenizer.ggml.token_type has {len(self.token_types)} entries, tokens has {n}")
        self.token_attrs: list[int] = _llama_cpp_attrs(self.tokens, self.token_types, md)
        self._ids: dict[str, int] | None = None  # text -> id, built on first token_id()

        # Defaults are llama.cpp's when the GGUF leaves a key out.
        spm = self.model == "llama"
        self.bos_id: int | None = int(md.get("tokenizer.ggml.bos_token_id", 1 if spm else 11))
        self.eos_id: int | None = int(md.get("tokenizer.ggml.eos_token_id", 2 if spm else 11))
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", spm or self.pre in _ADD_BOS_DEFAULT))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", spm))
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if not 0 <= v < n:
                setattr(self, name, None)  # an id outside the vocabulary means "none", as in llama.cpp
        self.eog_ids: frozenset[int] = self._eog(md)

        # Texts cut out before BPE, longest first (llama.cpp sorts cache_special_tokens by byte length;
        # ties keep id order here, which only matters for equal-length texts that overlap).
        cut = [
            i for i, a in enumerate(self.token_attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)
        ]
        cut.sort(key=lambda i: -len(self.tokens[i].encode("utf-8", "surrogateescape")))
        self._special = [(self.tokens[i], i) for i in cut]
        # without special=True, control and unknown tokens are plain text (llama.cpp's parse_special=false)
        self._user_defined = [
            (self.tokens[i], i) for i in cut if not self.token_attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)
        ]

        if spm:
            self._init_spm(md)
        else:
            self._init_bpe(md)

    # ---- construction -------------------------------------------------------------------------------

    def _eog(self, md: Mapping[str, object]) -> frozenset[int]:
        """End-of-generation ids, as llama.cpp's special_eog_ids: EOS, the declared EOT/EOM ids, and the
        control tokens whose text ends a turn (those _llama_cpp_attrs left CONTROL: gpt-oss' <|end|> is not)."""
        n = len(self.tokens)
        ids = {self.eos_id} if self.eos_id is not None else set()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = md.get(key)
            if isinstance(v, int) and 0 <= v < n:
                ids.add(v)
        ids.update(i for i, t in enumerate(self.tokens) if t in _EOG_TEXTS and self.token_attrs[i] & ATTR_CONTROL)
        return frozenset(ids)

    @classmethod
    def from_metadata(cls, md: Mapping[str, object]) -> Tokenizer:
        """From a GGUF metadata dict: key -> value, arrays as lists (``describe_gguf(path)["metadata"]``)."""
        return cls(md)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Read the GGUF's metadata with the engine's reader and build the tokenizer from it."""
        from .ggufinfo import describe_gguf  # needs the native library; from_metadata does not

        return cls(describe_gguf(path)["metadata"])

    def _init_bpe(self, md: Mapping[str, object]) -> None:
        from tokenizers import Regex, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        regexes = _BPE_PRE.get(self.pre)
        if regexes is None:
            raise ValueError(
                f"unsupported tokenizer.ggml.pre {self.pre!r} for a gpt2 vocabulary; "
                f"supported: {', '.join(sorted(_BPE_PRE))}"
            )
        merges_md = md.get("tokenizer.ggml.merges")
        if not merges_md:
            raise ValueError("gpt2 vocabulary without tokenizer.ggml.merges")
        _check_array(md, "tokenizer.ggml.merges", str)
        merges = []
        for m in merges_md:
            # llama.cpp splits at the first space after position 0 (a merge's left part is never empty).
            k = m.find(" ", 1)
            if k < 0:
                raise ValueError(f"malformed merge {m!r} in tokenizer.ggml.merges (expected 'left right')")
            merges.append((m[:k], m[k + 1 :]))
        vocab = {}
        for i, t in enumerate(self.tokens):
            vocab[t] = i  # a duplicated text maps to its last id, like llama.cpp's token_to_id
        try:
            bpe = BPE(vocab=vocab, merges=merges, ignore_merges=self.pre in _IGNORE_MERGES)
        except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of a text not in tokens
            raise ValueError(f"cannot build a BPE tokenizer from tokenizer.ggml.tokens/merges: {e}") from e
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._hf = hf

        inv = {c: b for b, c in _gpt2_byte_map().items()}

        def piece(i: int) -> bytes:
            a = self.token_attrs[i]
            if a & (ATTR_USER_DEFINED | ATTR_CONTROL | ATTR_UNKNOWN):
                return self.tokens[i].encode("utf-8", "surrogateescape")
            if a & ATTR_NORMAL:
                # byte-level text back to raw bytes; a character outside the map is kept as UTF-8
                return b"".join(bytes((inv[c],)) if c in inv else c.encode("utf-8") for c in self.tokens[i])
            return b""  # unused / undefined / byte tokens render as nothing in a gpt2 vocabulary

        self._piece_fn = piece

    def _init_spm(self, md: Mapping[str, object]) -> None:
        import sentencepiece

        n = len(self.tokens)
        scores = md.get("tokenizer.ggml.scores")
        scores = list(scores) if scores is not None else [0.0] * n
        if len(scores) != n:
            raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries, tokens has {n}")
        raw = [t.encode("utf-8", "surrogateescape") for t in self.tokens]
        unk = md.get("tokenizer.ggml.unknown_token_id")
        types = list(self.token_types)
        if unk is None:
            unk = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
        if unk is None or not 0 <= int(unk) < n:
            raise ValueError("llama vocabulary without an unknown token (tokenizer.ggml.unknown_token_id)")
        unk = int(unk)
        # Exactly one UNKNOWN piece for SentencePiece: the declared one.
        types = [TOKEN_NORMAL if t == TOKEN_UNKNOWN else t for t in types]
        types[unk] = TOKEN_UNKNOWN
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(_spm_model_proto(raw, scores, types, unk))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot build a SentencePiece model from this llama vocabulary: {e}") from e
        self._sp = sp
        self._byte_ids = {}
        for i, t in enumerate(self.token_types):
            if t == TOKEN_BYTE and len(self.tokens[i]) == 6 and self.tokens[i].startswith("<0x"):
                self._byte_ids[i] = int(self.tokens[i][3:5], 16)

        def piece(i: int) -> bytes:
            a = self.token_attrs[i]
            if a & (ATTR_USER_DEFINED | ATTR_CONTROL | ATTR_UNKNOWN):
                return raw[i]
            if a & ATTR_NORMAL:
                return raw[i].replace(_SPIECE_SPACE.encode(), b" ")
            if i in self._byte_ids:
                return bytes((self._byte_ids[i],))
            return b""

        self._piece_fn = piece

    # ---- public API ---------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int | None:
        """The id of the token whose text is exactly ``text`` (e.g. "<|image_pad|>"), or None."""
        if self._ids is None:
            self._ids = {}
            for i, t in enumerate(self.tokens):
                self._ids.setdefault(t, i)
        return self._ids.get(text)

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(text, add_special=add_bos, parse_special=special)``.

        ``add_bos`` adds what the model's metadata asks for (``tokenizer.ggml.add_bos_token`` /
        ``add_eos_token``), so a model that declares no BOS (SmolLM2) gets none. ``special=True`` also
        turns the texts of control tokens (e.g. ``<start_of_turn>``) into those tokens.
        """
        try:
            text.encode("utf-8")  # a str with lone surrogates (e.g. from os.fsdecode) is not text to tokenize
        except UnicodeEncodeError as e:
            raise ValueError(f"cannot tokenize text that is not valid Unicode ({e.reason} at {e.start})") from e
        out: list[int] = []
        if add_bos and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        frags = self._partition(text, special)
        if self.model == "llama":
            prev_special = True  # llama.cpp: the first fragment counts as following a special token
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    f = " " + f
                out.extend(self._sp.EncodeAsIds(f.replace(" ", _SPIECE_SPACE)))
                prev_special = False
        else:
            raw = [f for f in frags if not isinstance(f, int)]
            enc = iter(self._hf.encode_batch(raw, add_special_tokens=False)) if raw else iter(())
            for f in frags:
                out.extend([f] if isinstance(f, int) else next(enc).ids)
        if add_bos and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """Text of ``ids`` as ``llama_detokenize(remove_special=False, unparse_special=special)``: control
        and unknown tokens are left out unless ``special=True``; with ``add_space_prefix`` the first
        token's leading space is dropped."""
        chunks = []
        for k, i in enumerate(ids):
            p = self.piece(i, special)
            if k == 0 and self.add_space_prefix and p.startswith(b" "):
                p = p[1:]  # llama.cpp strips it from the first token only, even when that is BOS
            chunks.append(p)
        return b"".join(chunks).decode("utf-8", "replace")

    def piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token adds to decoded text (llama_token_to_piece): b"" for control and unknown
        tokens unless ``special``. Streaming text is these pieces joined (no first-token space stripping)."""
        i = int(token_id)
        if not 0 <= i < len(self.tokens):
            raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.tokens)})")
        if not special and self.token_attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        return self._piece_fn(i)

    def token_to_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a control token's own text; b"" for unused ones)."""
        return self._piece_fn(int(token_id))

    # ---- internals ----------------------------------------------------------------------------------

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: cut out special-token texts, longest first."""
        frags: list[str | int] = [text] if text else []
        for tok, tid in self._special if special else self._user_defined:
            if tok not in text:  # one C-level scan of the whole text skips most tokens
                continue
            nxt: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    nxt.append(f)
                    continue
                pieces = f.split(tok)  # non-overlapping, left to right: llama.cpp's find loop
                for k, p in enumerate(pieces):
                    if k:
                        nxt.append(tid)
                    if p:
                        nxt.append(p)
            frags = nxt
        return frags

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"
        )

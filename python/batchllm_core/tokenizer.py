"""Tokenizers: a Hugging Face ``tokenizers`` wrapper, the byte-level tokenizer of the embedded tiny
model, chat templates (jinja2, rendered as transformers does) and incremental detokenization.

Both tokenizer classes share one interface: ``encode``, ``encode_batch``, ``decode``,
``apply_chat_template``, ``bos_token_id``, ``eos_token_ids``, ``pad_token_id``, ``vocab_size``,
``all_special_ids``. Chat prompts are rendered to text by the template (which writes the bos token
itself when the model wants one) and encoded with ``add_special_tokens=False``, as transformers does.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]


class _TokenizerBase:
    """What both tokenizers share: special ids, chat template, batch encode."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of ``token_ids``; ``clean_up_tokenization_spaces`` (None: the tokenizer's setting)
        applies transformers' clean-up of spaces before punctuation (:meth:`clean_up`)."""
        raise NotImplementedError

    def clean_up(self, text: str) -> str:
        """``text`` after the tokenizer's clean-up of spaces, if it has one (``decode`` does this
        to the whole text: the incremental detokenizer works on the text before it)."""
        return text

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (same as ``encode`` one by one)."""
        return [self.encode(text, add_special_tokens) for text in texts]

    def token_texts(self) -> list[str | None]:
        """What each token id adds to decoded text (special tokens skipped) after a plain letter,
        by id; None where that is not a clean suffix of the context's text (a tokenizer that
        rewrites its left neighbour). Computed once. A token after another one decodes to these
        characters (a SentencePiece word start keeps its space here, which a text's first token
        loses); a token that is part of a multi-byte character adds U+FFFD.
        """
        cached = getattr(self, "_token_texts", None)
        if cached is None:
            anchor, head = [], ""
            for word in ("a", "e", "the", "x", "1", "."):  # a token with text of its own
                ids = self.encode(word, add_special_tokens=False)
                if len(ids) == 1 and ids[0] not in self.all_special_ids and self._decode_each([ids])[0]:
                    anchor, head = ids, self._decode_each([ids])[0]
                    break
            texts = self._decode_each([[*anchor, i] for i in range(self.vocab_size)])
            cached = [t[len(head):] if t.startswith(head) else None for t in texts]
            if not anchor:  # no one-token word: a space between tokens would not be seen; assume one
                cached = [None if t is None else " " + t for t in cached]
            self._token_texts = cached
        return cached

    def _decode_each(self, sequences: list[list[int]]) -> list[str]:
        """Each sequence's text, special tokens skipped, before any clean-up of spaces."""
        return [self.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) for ids in sequences]

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos token (``eos_token_ids`` is what ends generation)."""
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_kwargs: Any) -> str | list[int]:
        """Render a conversation with the chat template (and encode it when ``tokenize``).

        Parameters
        ----------
        messages : list of dict
            ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt : bool
            Append the header that starts the assistant's turn.
        tokenize : bool
            Return token ids (encoded without adding special tokens) instead of text.
        **template_kwargs
            Extra variables the template reads (e.g. ``tools``, ``enable_thinking``).
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no "
                             "'chat_template' and there is no chat_template.jinja)")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of dicts with 'role' and 'content'")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                    "pad_token": self.pad_token, "unk_token": self.unk_token}
        text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    **{**specials, **template_kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


class Tokenizer(_TokenizerBase):
    """A Hugging Face tokenizer directory: ``tokenizer.json`` (the ``tokenizers`` library),
    ``tokenizer_config.json`` (special tokens, bos/eos adding, chat template),
    ``chat_template.jinja``, and ``generation_config.json``/``config.json`` (eos ids).

    Examples
    --------
    >>> tok = Tokenizer.from_pretrained("/models/llama")           # doctest: +SKIP
    >>> tok.decode(tok.encode("hello"))                            # doctest: +SKIP
    'hello'
    """

    def __init__(self, backend: Any, config: dict[str, Any], chat_template: str | None,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self._backend = backend
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            setattr(self, name, _token_content(config.get(name)))
        self.chat_template = chat_template
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # Some tokenizers (Llama's) say in tokenizer_config that bos/eos are added while the
        # tokenizer.json post-processor does not add them; transformers then adds them itself.
        probe = backend.encode("", add_special_tokens=True).ids
        self._prepend_bos = bool(config.get("add_bos_token")) and self.bos_token_id is not None \
            and (not probe or probe[0] != self.bos_token_id)
        self._append_eos = bool(config.get("add_eos_token")) and self.eos_token_id is not None \
            and (not probe or probe[-1] != self.eos_token_id)
        own_eos = (self.eos_token_id,) if self.eos_token_id is not None else ()
        self.eos_token_ids = tuple(eos_token_ids) or own_eos

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a local directory; errors name the missing or broken file."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file}: tokenizer not found (only tokenizer.json "
                                    "tokenizers are supported)")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust library raises a bare Exception
            raise ValueError(f"{tokenizer_file}: cannot be read ({err})") from err
        config = _read_json(path / "tokenizer_config.json") or {}
        special_map = _read_json(path / "special_tokens_map.json") or {}
        for name, value in special_map.items():
            config.setdefault(name, value)
        return cls(backend, config, _chat_template(path, config), _generation_eos_ids(path))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        decoder = self._backend.get_added_tokens_decoder()
        return sorted(i for i, token in decoder.items() if token.special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` as transformers adds bos/eos."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._add_special(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        if not add_special_tokens:
            return [e.ids for e in encodings]
        return [self._add_special(e.ids) for e in encodings]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = self._clean_up_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def clean_up(self, text: str) -> str:
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def _decode_each(self, sequences: list[list[int]]) -> list[str]:
        # One call into the Rust library, which decodes in parallel (~0.1 s for 150,000 ids).
        return self._backend.decode_batch(sequences, skip_special_tokens=True)

    def _add_special(self, ids: list[int]) -> list[int]:
        if self._prepend_bos:
            ids = [self.bos_token_id, *ids]
        if self._append_eos:
            ids = [*ids, self.eos_token_id]
        return ids


class ByteTokenizer(_TokenizerBase):
    """Byte-level tokenizer of the embedded tiny model: ids 0..255 are the UTF-8 bytes, then
    the special tokens of :data:`BYTE_SPECIAL_TOKENS` (256..260). Special tokens written in the text
    are recognized, as Hugging Face tokenizers do. Vocab size 261.

    Examples
    --------
    >>> tok = ByteTokenizer()
    >>> tok.encode("hi")
    [256, 104, 105]
    >>> tok.decode([256, 104, 105])
    'hi'
    """

    chat_template = ("{{ bos_token }}{% for message in messages %}"
                     "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

    def __init__(self) -> None:
        self.bos_token, self.eos_token, self.pad_token = "<|bos|>", "<|eos|>", "<|pad|>"
        self._special_ids = {token: 256 + i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
        self._special_tokens = {i: token for token, i in self._special_ids.items()}
        # Generation ends at eos and at the end of an assistant turn.
        self.eos_token_ids = (self._special_ids["<|eos|>"], self._special_ids["<|im_end|>"])

    @property
    def vocab_size(self) -> int:
        return 256 + len(BYTE_SPECIAL_TOKENS)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_tokens)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        data = token.encode("utf-8")
        return data[0] if len(data) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._special_ids["<|bos|>"]] if add_special_tokens else []
        for piece, is_special in _split_specials(text, BYTE_SPECIAL_TOKENS):
            ids.extend([self._special_ids[piece]] if is_special else piece.encode("utf-8"))
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        pieces: list[str] = []
        pending = bytearray()
        for token_id in token_ids:
            token_id = int(token_id)
            if 0 <= token_id < 256:
                pending.append(token_id)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if token_id in self._special_tokens and not skip_special_tokens:
                pieces.append(self._special_tokens[token_id])
            # ids past the vocabulary (a random model padded wider) decode to nothing
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)


BYTE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")


class IncrementalDetokenizer:
    """Text of a growing token sequence, delta by delta, without re-decoding everything and
    without emitting half of a multi-byte character (vLLM's prefix/read offset method).

    :attr:`text` equals ``tokenizer.decode(generated, skip_special_tokens)`` before the tokenizer's
    clean-up of spaces (which looks at characters on both sides, so a text growing token by token
    cannot follow it; ``tokenizer.clean_up`` applies it to a finished text). The prompt is not
    used as decoding context (it would make a SentencePiece output start with the space that a
    plain decode drops), so stop strings are matched on the text that is returned.

    Examples
    --------
    >>> detok = IncrementalDetokenizer(ByteTokenizer())
    >>> detok.append([104, 0xC3]), detok.append([0xA9])      # held back until 'é' is complete
    ('', 'hé')
    >>> detok.text
    'hé'
    """

    # Tokens kept before the new ones as context: a token's text can depend on its left
    # neighbour (SentencePiece's leading space, byte fallback).
    _CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: _TokenizerBase, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        del prompt_token_ids  # accepted for call sites that pass it; see the class docstring
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def append(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; returns the text they completed (may be '' while a character
        is still incomplete) and extends :attr:`text`."""
        self._ids.extend(int(t) for t in token_ids)

        def decode(ids: list[int]) -> str:
            return self._tokenizer.decode(ids, self._skip_special, clean_up_tokenization_spaces=False)

        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text):]
        self._prefix_offset = max(self._read_offset, len(self._ids) - self._CONTEXT_TOKENS)
        self._read_offset = len(self._ids)
        self.text += delta
        return delta


def find_stop_string(text: str, stop: Sequence[str], search_from: int = 0) -> tuple[int, str] | None:
    """Earliest stop string in ``text`` that ends at or after ``search_from``.

    Returns ``(start, stop_string)`` or None; the caller truncates at ``start`` (vLLM drops the stop
    string from the output). Searching from ``len(old_text) - max(len(s)) + 1`` finds stop strings
    that straddle an old and a new delta.
    """
    best: tuple[int, str] | None = None
    for stop_string in stop:
        if not stop_string:
            continue
        start = text.find(stop_string, max(0, search_from - len(stop_string) + 1))
        if start >= 0 and (best is None or start < best[0]):
            best = (start, stop_string)
    return best


def render_chat_template(template: str, messages: list[Message], add_generation_prompt: bool,
                         **variables: Any) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks,
    ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``)."""
    return _compile_template(template).render(messages=messages,
                                              add_generation_prompt=add_generation_prompt,
                                              **variables)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _split_specials(text: str, specials: Sequence[str]) -> list[tuple[str, bool]]:
    """Split text into (piece, is_special) at every occurrence of a special token."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    while start < len(text):
        hits = [(text.find(s, start), s) for s in specials]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            break
        pos, special = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
        if pos > start:
            pieces.append((text[start:pos], False))
        pieces.append((special, True))
        start = pos + len(special)
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # transformers >= 4.50 saves the template on its own
        return jinja_file.read_text()
    template = config.get("chat_template") or (_read_json(path / "chat_template.json") or {}).get(
        "chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    """eos ids that end generation, as transformers' generate picks them: generation_config.json,
    else config.json; empty when neither says."""
    for name in ("generation_config.json", "config.json"):
        value = (_read_json(path / name) or {}).get("eos_token_id")
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list) and value:
            return tuple(int(v) for v in value)
    return ()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text

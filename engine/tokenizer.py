"""Tokenizer (HF `tokenizers` backend built from GGUF metadata or `tokenizer.json`), chat template,
and incremental detokenization for streaming."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from engine.chat_template import ChatTemplate
from engine.errors import InvalidRequestError, UnsupportedModelError

if TYPE_CHECKING:
    import gguf

# Tokens that end a turn or a document in the chat formats we know; any present stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                      "<end_of_turn>", "<|end|>", "</s>")  # fmt: skip

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the regex llama.cpp splits with; others use GPT-2's built-in regex.
_PRE_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT}  # fmt: skip
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its chat template and stop tokens."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        ends = {backend.token_to_id(t) for t in END_OF_TURN_TOKENS}
        ends |= {eos_token_id, *extra_stop_ids}
        self.stop_token_ids: frozenset[int] = frozenset(i for i in ends if i is not None)
        # Prepend BOS ourselves only when the checkpoint asks and the post-processor does not.
        bos = [] if bos_token_id is None else [bos_token_id]
        adds_bos = bool(bos) and backend.encode("").ids[:1] == bos
        self._bos_prefix: list[int] = bos if add_bos_token and not adds_bos else []
        specials = {"bos_token": self._token(bos_token_id), "eos_token": self._token(eos_token_id)}
        self._chat_template = ChatTemplate(chat_template, specials) if chat_template else None

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added only if the checkpoint says so (like HF)."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._bos_prefix + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        if self._chat_template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt")
        return self._chat_template.render(messages, add_generation_prompt)

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Template, then encode without adding special tokens (HF `apply_chat_template`)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """From `tokenizer.ggml.*` metadata; only byte-level BPE ("gpt2") vocabularies."""
        meta = _GGUFTokenizerMeta(reader)
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"unsupported GGUF tokenizer model {model!r} (only gpt2 BPE)"
            )
        backend = _byte_level_backend(meta)
        extra = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_stop_ids=[i for i in extra if i is not None],
        )

    @classmethod
    def from_hf_dir(cls, model_dir: Path) -> Tokenizer:
        """From `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`)."""
        if not (model_dir / "tokenizer.json").is_file():
            raise UnsupportedModelError(f"no tokenizer.json in {model_dir}")
        backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        generation = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        extra = generation if isinstance(generation, list) else [generation]
        return cls(
            backend,
            bos_token_id=_token_id(backend, config.get("bos_token")),
            eos_token_id=_token_id(backend, config.get("eos_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template,
            extra_stop_ids=[i for i in extra if isinstance(i, int)],
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 characters.

    Decodes a small window twice per token (vLLM/TGI's prefix/read offsets): the text of the
    window before the new token and with it; the difference is the delta, emitted only once it
    no longer ends in U+FFFD (a multi-byte character still split across tokens).
    """

    _PROMPT_CONTEXT = 6  # prompt tokens kept so a first token's leading space decodes right

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids = list(prompt_ids or [])[-self._PROMPT_CONTEXT :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        prefix, full = self._decode_window()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        return self._advance(full[len(prefix) :])

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        prefix, full = self._decode_window()
        return self._advance(full[len(prefix) :])

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix = self._tokenizer.decode(window[:read], skip_special_tokens=self._skip)
        return prefix, self._tokenizer.decode(window, skip_special_tokens=self._skip)

    def _advance(self, delta: str) -> str:
        del self._ids[: self._read_offset]  # the old read point starts the next window
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta


class _GGUFTokenizerMeta:
    """Read-only view of the `tokenizer.*` GGUF fields we use."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()


def _byte_level_backend(meta: _GGUFTokenizerMeta) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equal to the one transformers builds for the file."""
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    llama3 = _PRE_SPLITS.get(pre) is _LLAMA3_SPLIT  # Llama 3 looks words up before merging
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, token_types, strict=False))
    control = [t for t, kind in kinds if kind == _GGUF_CONTROL and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in kinds if kind == _GGUF_USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for `tokenizer.ggml.pre`, then the byte-level mapping."""
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer.json: every digit on its own, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    mapping = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return dict(sorted(mapping.items()))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_id(backend: tokenizers.Tokenizer, token: str | dict[str, Any] | None) -> int | None:
    if isinstance(token, dict):  # AddedToken serialized as {"content": ..., ...}
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)

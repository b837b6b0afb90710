"""The Tokenizer engine uses: one backend (SentencePiece or `tokenizers`) plus the model's
special tokens, BOS/EOS policy and chat template."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Protocol

from engine.tokenizer.chat import render_chat_template


class Backend(Protocol):
    """What a tokenizer library must provide. `encode` applies the BOS/EOS policy itself."""

    vocab_size: int
    special_ids: set[int]     # ids decode(skip_special_tokens=True) drops

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def id_to_piece(self, token_id: int) -> str | None: ...
    def piece_to_id(self, piece: str) -> int | None: ...


class SpecialTokenSplitter:
    """Splits raw text on special-token strings, longest first, so that a library that would
    not match them itself (SentencePiece) never sees them."""

    def __init__(self, tokens: dict[str, int]):
        self.tokens = {t: i for t, i in tokens.items() if t}
        names = sorted(self.tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def split(self, text: str) -> Iterator[str | int]:
        """Yields plain-text chunks (str, never empty) and special-token ids (int) in order."""
        if self._pattern is None:
            if text:
                yield text
            return
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                yield text[start:match.start()]
            yield self.tokens[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:]


class Tokenizer:
    """A model's tokenizer: encode/decode, special tokens and chat template.

    Build one with `engine.tokenizer.load_tokenizer`.
    """

    def __init__(self, backend: Backend, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, extra_eos_token_ids: Iterable[int] = (),
                 unk_token_id: int | None = None, pad_token_id: int | None = None,
                 chat_template: str | None = None, name_or_path: str = ""):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.eos_token_ids: set[int] = set(extra_eos_token_ids)
        if eos_token_id is not None:
            self.eos_token_ids.add(eos_token_id)
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        named = {bos_token_id, eos_token_id, unk_token_id, pad_token_id} - {None}
        self.all_special_ids: set[int] = set(backend.special_ids) | named

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)})")

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def bos_token(self) -> str | None:
        return self.id_to_piece(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_piece(self.eos_token_id) if self.eos_token_id is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
            text: raw text; special tokens written in it ("<|im_start|>") map to their ids.
            add_special_tokens: add BOS/EOS where the model's configuration asks for them.
        Returns:
            The token ids.
        """
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are ignored.

        Args:
            ids: token ids.
            skip_special_tokens: drop every id in `all_special_ids`.
        Returns:
            The decoded text.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self.backend.decode(ids, skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (None outside the vocabulary)."""
        return self.backend.id_to_piece(int(token_id))

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """Vocabulary entries of ids, like transformers' method of the same name."""
        if isinstance(ids, int):
            return self.id_to_piece(ids)
        return [self.id_to_piece(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Ids of vocabulary entries (None for an entry not in the vocabulary)."""
        if isinstance(tokens, str):
            return self.backend.piece_to_id(tokens)
        return [self.backend.piece_to_id(t) for t in tokens]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render a conversation with the model's chat template (as transformers does).

        Args:
            messages: [{"role": ..., "content": ...}, ...].
            add_generation_prompt: end with the prompt that opens the assistant's turn.
            **kwargs: more variables for the template (tools, documents, ...).
        Returns:
            The prompt text; encode it with add_special_tokens=False when the template
            writes the BOS token itself.
        Raises:
            ValueError: the model has no chat template, or the template raised an error.
        """
        if not self.chat_template:
            raise ValueError(f"{self.name_or_path}: the tokenizer has no chat template")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            unk_token=self._piece_or_empty(self.unk_token_id),
            pad_token=self._piece_or_empty(self.pad_token_id), **kwargs)

    def _piece_or_empty(self, token_id: int | None) -> str:
        return (self.id_to_piece(token_id) or "") if token_id is not None else ""

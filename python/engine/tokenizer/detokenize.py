"""Streaming detokenization with vLLM's prefix/read offsets.

Decoding token by token is wrong twice over: a SentencePiece piece's leading space ("▁Paris")
is dropped when the piece is decoded alone, and a character whose UTF-8 bytes span several
byte-level or byte-fallback tokens decodes as U+FFFD until its last byte arrives. So each step
decodes a short window of context, `ids[prefix_offset:]`, and emits only what it adds to the
text of `ids[prefix_offset:read_offset]`; text that ends in U+FFFD is held back.
"""

from __future__ import annotations

from engine.tokenizer.base import Tokenizer

# Prompt tokens kept as context for the first generated token (vLLM uses the same number).
_INITIAL_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas.

    At the end of a sequence, `"".join(deltas) + flush()` equals the text of the generated
    ids decoded in the context of the prompt: `tok.decode(generated)` when the prompt is
    empty, and with a SentencePiece model the leading space of the first generated piece
    kept (" Paris", where `tok.decode` alone would give "Paris").
    """

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        """Args:
            tok: the model's tokenizer.
            prompt_ids: the prompt (context only: its text is never emitted).
            skip_special_tokens: leave special tokens out of the text.
        """
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        # Skipped tokens are dropped before the window so they never shift its start.
        self.ids: list[int] = [i for i in prompt_ids if self._kept(i)]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - _INITIAL_CONTEXT, 0)
        self.text = ""

    def _kept(self, token_id: int) -> bool:
        return not (self.skip_special_tokens and token_id in self.tok.all_special_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token.

        Args:
            token_id: the token.
        Returns:
            The new text (possibly "", never ending in an incomplete UTF-8 sequence).
        """
        if not self._kept(token_id):
            return ""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (the sequence ended inside a character).

        Returns:
            The remaining text, "" when nothing is held back.
        """
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

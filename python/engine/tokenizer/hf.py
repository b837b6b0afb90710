"""`tokenizers` backend: a tokenizer.json, or a byte-level BPE rebuilt from a GGUF."""

from __future__ import annotations


class HFTokenizersBackend:
    """Wraps a `tokenizers.Tokenizer`. The library splits its added tokens out of the text
    before the model sees it, and its post-processor adds BOS/EOS."""

    def __init__(self, tokenizer, *, source: str):
        self.tok = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items()
                            if t.special}

    @classmethod
    def from_file(cls, path: str) -> HFTokenizersBackend:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a plain Exception
            raise ValueError(f"{path}: not a loadable tokenizer.json ({e})") from e
        # The tokenizer_config.json may ask for padding/truncation elsewhere; engine never
        # wants either from the tokenizer (all-MiniLM's tokenizer.json pads to 128).
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, source=path)

    def ensure_bos(self, bos_token_id: int | None, add_bos_token: bool | None) -> None:
        """Give a tokenizer.json without a post-processor the BOS its config asks for."""
        from tokenizers import processors

        if not add_bos_token or bos_token_id is None or self.tok.post_processor is not None:
            return
        bos = self.tok.id_to_token(bos_token_id)
        self.tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_token_id)])

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

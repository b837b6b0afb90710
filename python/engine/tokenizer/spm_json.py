"""A SentencePiece BPE vocabulary as an equivalent `tokenizers` BPE (a tokenizer.json).

Written beside tokenizer.model by write_hf_tokenizer_from_gguf: transformers' own
SentencePiece conversion skips the dummy-prefix space when the text already starts with one
(so " Hello" differs from SentencePiece and llama.cpp); this one always prepends it, as
SentencePiece does. Merges come from the piece scores: SentencePiece BPE merges the adjacent
pair whose merged piece scores highest, so ranking each pair by its merged piece's score
gives `tokenizers` the same order.
"""

from __future__ import annotations

from engine.tokenizer.gguf_vocab import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN,
                                         TOKEN_USER_DEFINED, GGUFVocab, spm_piece_types,
                                         template_processor)


def _merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for piece, idx in ids.items():
        if types[idx] != TOKEN_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[idx], idx, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_spm_bpe_tokenizer(vocab: GGUFVocab):
    """A `tokenizers.Tokenizer` that tokenizes as SentencePiece does with this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    types = spm_piece_types(vocab)
    scores = [float(s) for s in (vocab.scores or [0.0] * len(vocab.tokens))]
    unk = vocab.tokens[types.index(TOKEN_UNKNOWN)]
    model = models.BPE({t: i for i, t in enumerate(vocab.tokens)},
                       _merges(vocab.tokens, scores, types), unk_token=unk, fuse_unk=True,
                       byte_fallback=TOKEN_BYTE in types)
    tok = Tokenizer(model)
    steps = [normalizers.Prepend("▁")] if vocab.add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        decoder_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(decoder_steps)
    # Split out of the raw text like engine's SentencePieceBackend (and llama.cpp) does, the
    # dummy prefix then added to the text after each.
    tok.add_tokens([AddedToken(vocab.tokens[i], special=t != TOKEN_USER_DEFINED,
                               normalized=False)
                    for i, t in enumerate(types)
                    if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)])
    processor = template_processor(vocab, processors)
    tok.post_processor = None if isinstance(processor, processors.ByteLevel) else processor
    return tok

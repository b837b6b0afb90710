"""Read a GGUF file's tokenizer metadata and rebuild the tokenizer it describes.

"gpt2" vocabularies become a byte-level BPE `tokenizers.Tokenizer` built from the tokens and
merges; "llama" vocabularies become a SentencePiece ModelProto (serialized bytes) built from
the tokens, scores and token types. Both are what llama.cpp itself tokenizes with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.model.gguf_file import read_metadata

# GGUF token types (llama.cpp's llama_token_type); SentencePiece uses the same numbers.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

SUPPORTED_MODELS = ("gpt2", "llama")

# Pre-tokenizer regexes of llama.cpp's tokenizer.ggml.pre names (llama-vocab.cpp).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRES = ("gpt2", "gpt-2", "default", "olmo", "jais")
_DIGIT_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")
_QWEN2_PRES = ("qwen2", "deepseek-r1-qwen", "megrez")
SUPPORTED_PRES = _GPT2_PRES + _DIGIT_PRES + _LLAMA3_PRES + _QWEN2_PRES


@dataclass
class GGUFVocab:
    """The tokenizer a GGUF file describes, as plain Python values."""

    path: str
    model: str                       # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None                  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    add_space_prefix: bool = True
    chat_template: str | None = None
    architecture: str | None = None
    extra_eos_ids: set[int] = field(default_factory=set)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def read_gguf_vocab(path: str) -> GGUFVocab:
    """Read tokenizer.* metadata from a GGUF file.

    Args:
        path: the .gguf file.
    Returns:
        A GGUFVocab.
    Raises:
        ValueError: the file is not a readable GGUF, has no tokenizer, or names a tokenizer
            model engine cannot rebuild.
    """
    meta = read_metadata(path)

    def get(key, default=None):
        return meta.get(key, default)

    model = get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path}: no tokenizer.ggml.model in the GGUF metadata")
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"{path}: unsupported tokenizer.ggml.model {model!r}; "
                         f"expected one of {', '.join(SUPPORTED_MODELS)}")
    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens in the GGUF metadata")
    types = get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    eot = [get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    return GGUFVocab(
        path=path, model=model, pre=get("tokenizer.ggml.pre"), tokens=list(tokens),
        token_types=[int(t) for t in types], scores=get("tokenizer.ggml.scores"),
        merges=get("tokenizer.ggml.merges"),
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        unk_token_id=get("tokenizer.ggml.unknown_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos_token=bool(get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", model == "llama")),
        chat_template=get("tokenizer.chat_template"),
        architecture=get("general.architecture"),
        extra_eos_ids={int(i) for i in eot if i is not None},
    )


# ---------------------------------------------------------------- SentencePiece ("llama")

def build_spm_model_proto(vocab: GGUFVocab) -> bytes:
    """Serialize a SentencePiece BPE ModelProto equivalent to the GGUF vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(vocab.tokens)
    trainer.byte_fallback = TOKEN_BYTE in vocab.token_types
    # SentencePiece finds bos/eos/pad by piece text; -1 disables the ones absent.
    for name in ("bos", "eos", "pad"):
        token_id = getattr(vocab, f"{name}_token_id")
        if token_id is not None and 0 <= token_id < len(vocab.tokens):
            setattr(trainer, f"{name}_id", token_id)
            setattr(trainer, f"{name}_piece", vocab.tokens[token_id])
        else:
            setattr(trainer, f"{name}_id", -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = vocab.add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    types = spm_piece_types(vocab)
    trainer.unk_id = types.index(TOKEN_UNKNOWN)
    trainer.unk_piece = vocab.tokens[trainer.unk_id]
    for text, score, token_type in zip(vocab.tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = float(score)
        piece.type = token_type
    return proto.SerializeToString()


def spm_piece_types(vocab: GGUFVocab) -> list[int]:
    """Piece types SentencePiece accepts: exactly one UNKNOWN piece (the unk token).

    Real GGUFs mark padding entries UNKNOWN too (Phi-3's "[PAD32011]"...); llama.cpp treats
    them as special tokens, so they become CONTROL pieces.
    """
    types = [t if TOKEN_NORMAL <= t <= TOKEN_BYTE else TOKEN_NORMAL for t in vocab.token_types]
    unk_id = vocab.unk_token_id
    if unk_id is None or not 0 <= unk_id < len(types):
        unk_id = types.index(TOKEN_UNKNOWN) if TOKEN_UNKNOWN in types else 0
    types = [TOKEN_CONTROL if t == TOKEN_UNKNOWN else t for t in types]
    types[unk_id] = TOKEN_UNKNOWN
    return types


# ---------------------------------------------------------------- byte-level BPE ("gpt2")

def _pre_tokenizer(vocab: GGUFVocab):
    from tokenizers import Regex, pre_tokenizers

    pre = vocab.pre or "default"
    if pre in _GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    regex = _LLAMA3_REGEX if pre in _LLAMA3_PRES else _QWEN2_REGEX if pre in _QWEN2_PRES else None
    if regex is None:
        raise ValueError(f"{vocab.path}: unsupported tokenizer.ggml.pre {pre!r} for a gpt2 "
                         f"tokenizer; expected one of {', '.join(SUPPORTED_PRES)}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after the first character.
    idx = merge.find(" ", 1)
    if idx < 0:
        raise ValueError(f"bad BPE merge {merge!r}")
    return merge[:idx], merge[idx + 1:]


def build_bpe_tokenizer(vocab: GGUFVocab):
    """Build a `tokenizers.Tokenizer` (byte-level BPE) equivalent to the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if not vocab.merges:
        raise ValueError(f"{vocab.path}: gpt2 tokenizer without tokenizer.ggml.merges")
    ids = {text: i for i, text in enumerate(vocab.tokens)}
    merges = [_split_merge(m) for m in vocab.merges]
    ignore_merges = (vocab.pre or "") in _LLAMA3_PRES
    tok = Tokenizer(models.BPE(ids, merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    if (vocab.pre or "") in _QWEN2_PRES:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(vocab)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(vocab.tokens[i], special=t == TOKEN_CONTROL, normalized=False)
             for i, t in enumerate(vocab.token_types)
             if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    if added:
        tok.add_tokens(added)
    tok.post_processor = template_processor(vocab, processors)
    return tok


def template_processor(vocab: GGUFVocab, processors):
    """A post-processor adding BOS/EOS as add_bos_token/add_eos_token say (ByteLevel else)."""
    bos = vocab.token(vocab.bos_token_id) if vocab.add_bos_token else None
    eos = vocab.token(vocab.eos_token_id) if vocab.add_eos_token else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)
    first = [t for t in (bos,) if t] + ["$A"] + [t for t in (eos,) if t]
    pair = first + [t for t in (bos,) if t] + ["$B:1"] + [f"{t}:1" for t in (eos,) if t]
    ids = [vocab.bos_token_id if bos else None, vocab.eos_token_id if eos else None]
    specials = [(vocab.tokens[i], i) for i in dict.fromkeys(i for i in ids if i is not None)]
    return processors.TemplateProcessing(single=" ".join(first), pair=" ".join(pair),
                                         special_tokens=specials)

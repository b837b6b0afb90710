"""SentencePiece backend: a tokenizer.model (file or serialized ModelProto bytes)."""

from __future__ import annotations

from engine.tokenizer.base import SpecialTokenSplitter

_USER_DEFINED = 4  # sentencepiece_model_pb2 piece type


def _user_defined_ids(model_proto: bytes) -> list[int]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    return [i for i, piece in enumerate(proto.pieces) if piece.type == _USER_DEFINED]


class SentencePieceBackend:
    """Encodes with SentencePiece after splitting out special tokens, which SentencePiece
    would otherwise spell out piece by piece (control pieces never match raw text).

    Each text chunk is encoded separately, so the dummy-prefix space (when the model adds
    one) comes after every special or user-defined token too, as in llama.cpp.
    """

    def __init__(self, model_proto: bytes, *, source: str,
                 added_tokens: dict[int, tuple[str, bool]] | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 add_bos_token: bool = True, add_eos_token: bool = False):
        """Args:
            model_proto: the serialized ModelProto (the bytes of a tokenizer.model).
            source: the file it came from, for error messages.
            added_tokens: id -> (text, is_special) for tokens declared beside the model
                (tokenizer_config.json's added_tokens_decoder); they are split out of text.
            bos_token_id, eos_token_id: added when add_bos_token / add_eos_token say so.
        """
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a loadable SentencePiece model ({e})") from e
        self.num_pieces = self.sp.get_piece_size()
        # id -> text of every token split out of raw text and rendered outside SentencePiece
        # when decoding: control, unknown and (as llama.cpp does) user-defined pieces.
        self.outside: dict[int, str] = {}
        self.special_ids: set[int] = set()
        for i in range(self.num_pieces):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                self.outside[i] = self.sp.id_to_piece(i)
                self.special_ids.add(i)
        for i in _user_defined_ids(model_proto):
            self.outside[i] = self.sp.id_to_piece(i).replace("\u2581", " ")
        for i, (text, is_special) in (added_tokens or {}).items():
            if i >= self.num_pieces or is_special or i in self.outside:
                self.outside[i] = text
            if is_special:
                self.special_ids.add(i)
        self.splitter = SpecialTokenSplitter({t: i for i, t in self.outside.items()})
        self._piece_ids = {t: i for i, t in self.outside.items()}
        self.vocab_size = max([self.num_pieces, *(i + 1 for i in self.outside)])
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.add_eos_token = add_eos_token and eos_token_id is not None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token:
            ids.append(self.bos_token_id)
        for chunk in self.splitter.split(text):
            if isinstance(chunk, int):
                ids.append(chunk)
            else:
                ids.extend(self.sp.encode(chunk, out_type=int))
        if add_special_tokens and self.add_eos_token:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.outside:
                if skip_special_tokens and i in self.special_ids:
                    continue        # dropped without splitting the run around it
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                parts.append(self.outside[i])
            elif 0 <= i < self.num_pieces:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str | None:
        if token_id in self.outside:
            return self.outside[token_id]
        if 0 <= token_id < self.num_pieces:
            return self.sp.id_to_piece(token_id)
        return None

    def piece_to_id(self, piece: str) -> int | None:
        if piece in self._piece_ids:
            return self._piece_ids[piece]
        token_id = self.sp.piece_to_id(piece)
        if token_id == self.sp.unk_id() and piece != self.sp.id_to_piece(token_id):
            return None
        return token_id

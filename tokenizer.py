"""SentencePiece tokenizer for LLaMA, plus the `[PAD]` token that Alpaca adds after the vocabulary."""

import os

from sentencepiece import SentencePieceProcessor

PAD_PIECE = "[PAD]"  # how the added pad token reads where a token is shown as text (serve.py's logprobs)


class Tokenizer:
    """Wraps a SentencePiece model. Ids 0..n_words-1 are SentencePiece's own; `[PAD]` is appended as
    id n_words unless the model already defines a pad piece (LLaMA's does not: pad_id() == -1)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: tokenizer model not found")
        self.model_path = model_path
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no BOS/EOS pieces")
        own_pad = self.sp.pad_id()
        self.pad_id: int = own_pad if own_pad >= 0 else self.n_words

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: SentencePiece pieces plus the added `[PAD]` if there is one."""
        return max(self.n_words, self.pad_id + 1)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Encodes many texts at once in SentencePiece's C++ thread pool (no BOS/EOS)."""
        return self.sp.Encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        # `[PAD]` (and anything else past SentencePiece's range) is not text.
        return self.sp.Decode([i for i in ids if 0 <= i < self.n_words])

    def token_bytes(self, id: int, at_start: bool = False) -> bytes | None:
        """The bytes that id adds where decode() spells it out: a byte-fallback piece's own byte, else the piece
        with its ▁ as spaces, less the one leading ▁ that decode drops from the first piece of a text (at_start:
        none but control pieces before it). None for what decode leaves out: control pieces (BOS, EOS) and ids
        past SentencePiece's (`[PAD]`)."""
        if not 0 <= id < self.n_words or self.sp.IsControl(id):
            return None
        if self.sp.IsUnknown(id):
            return self.sp.Decode([id]).encode()  # " ⁇ "
        piece = self.sp.IdToPiece(id)
        if self.sp.IsByte(id):
            return bytes([int(piece[3:-1], 16)])  # "<0xE2>"
        if at_start:
            piece = piece.removeprefix("\u2581")
        return piece.replace("\u2581", " ").encode()

"""Baichuan2 tokenizer: a thin PreTrainedTokenizer over the sentencepiece model."""

import json
import os
import re
import shutil
from functools import cached_property

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import PreTrainedTokenizer

# Baichuan2 keeps these user-defined pieces for control; the chat tokens are two of them
# (<reserved_106>, <reserved_107>). Sentencepiece matches a user-defined piece wherever its
# string occurs in the text, so they are taken out of the text view (split_special_tokens).
RESERVED_PIECE = re.compile(r"<reserved_\d+>")


class BaichuanTokenizer(PreTrainedTokenizer):
    """Gives exactly sentencepiece's ids for plain text; special-token strings in the text
    (`</s>`, `<reserved_106>`, ...) map to their single ids, as in the official tokenizer.

    With `split_special_tokens=True` (transformers' switch, on a call or on the tokenizer) a
    text is only text: `</s>` and `<reserved_N>` are spelled in ordinary pieces, so content can
    never forge an eos or a chat token. Other user-defined pieces ("\\n", "<img>", ...) are text
    and stay whole.

    Baichuan2 adds neither BOS nor EOS by default (`add_bos_token` / `add_eos_token`).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        add_bos_token=False,
        add_eos_token=False,
        sp_model_kwargs=None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model_kwargs = sp_model_kwargs or {}
        # The base __init__ already asks for the vocabulary, so the model must exist first.
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state.pop("text_sp_model", None)  # a cached_property, rebuilt on use
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    @cached_property
    def text_sp_model(self) -> spm.SentencePieceProcessor:
        """The same sentencepiece model with the reserved pieces as control pieces, which
        sentencepiece never produces from text; their ids and every other piece are unchanged."""
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp_model.serialized_model_proto())
        for piece in proto.pieces:
            if piece.type == piece.USER_DEFINED and RESERVED_PIECE.fullmatch(piece.piece):
                piece.type = piece.CONTROL
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString(), **self.sp_model_kwargs)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # transformers' own split_special_tokens path only skips the added tokens (</s>, ...);
        # the reserved pieces are sentencepiece's, so the text view must skip them there too.
        if kwargs.get("split_special_tokens", self.split_special_tokens):
            text, _ = self.prepare_for_tokenization(text, **kwargs)
            return self.text_sp_model.encode(text, out_type=str)
        return super().tokenize(text, **kwargs)

    def _tokenize(self, text: str) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # sentencepiece decodes byte-fallback pieces and "▁" itself; special tokens are
        # kept verbatim between the decoded runs.
        pieces, out = [], []
        for token in tokens:
            if token in self.all_special_tokens:
                out.append(self.sp_model.decode(pieces) + token)
                pieces = []
            else:
                pieces.append(token)
        out.append(self.sp_model.decode(pieces))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            ids = ids + bos + token_ids_1 + eos
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers 5 drops add_bos_token / add_eos_token from the saved config; without them
        # a reload would fall back to this class's defaults only by luck, so write them back.
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = os.path.join(save_directory, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        tmp = config_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        os.replace(tmp, config_path)
        return files

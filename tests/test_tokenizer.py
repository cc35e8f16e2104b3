"""Tests of baichuan/tokenization_baichuan.py against sentencepiece itself, on the real
Baichuan2 tokenizer.model (read in place from ../shared/baichuan2) and on the tiny one."""

import hashlib
import json
import pickle

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from baichuan import BaichuanTokenizer
from conftest import REAL_TOKENIZER, SHARED, requires_real_tokenizer, sample_texts

TEXTS = [
    "你好，世界！今天天气怎么样？",  # Chinese
    "Hello world, how are you doing today?",  # English
    "1234567890 3.14159 2024年10月1日",  # digits (split one by one)
    "😀🤖👍🏽 emoji 🀄 🧌🪿",  # emoji; the last two are not in the vocabulary: byte fallback
    "a    b\t\tc\n\nd   \n  ",  # runs of spaces, tabs and newlines
    "  leading and trailing spaces  ",
    "混合 mixed 文本 123 😀\n\t结束。",  # mixed
    "ﬁ ＡＢＣ ① ㍿ \u200b",  # not normalised (identity), zero-width space
    " ",
    "\n",
]


def sp_processor(path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def real_tokenizer(real_tokenizer_path):
    return BaichuanTokenizer(vocab_file=str(real_tokenizer_path))


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return BaichuanTokenizer.from_pretrained(tiny_model_dir)


@requires_real_tokenizer
def test_real_tokenizer_file_is_baichuan2():
    digest = hashlib.sha256(REAL_TOKENIZER.read_bytes()).hexdigest()
    assert digest.startswith("79452955") and digest.endswith("a133cc2")
    assert sp_processor(REAL_TOKENIZER).get_piece_size() == 125696


@requires_real_tokenizer
@pytest.mark.parametrize("text", TEXTS)
def test_real_ids_equal_sentencepiece_and_decode_round_trips(real_tokenizer, text):
    expected = sp_processor(REAL_TOKENIZER).encode(text)
    ids = real_tokenizer.encode(text)
    assert ids == expected
    assert real_tokenizer(text)["input_ids"] == expected
    assert real_tokenizer.decode(ids) == text


@requires_real_tokenizer
def test_real_special_ids(real_tokenizer):
    assert real_tokenizer.vocab_size == len(real_tokenizer) == 125696
    assert real_tokenizer.convert_tokens_to_ids(["<reserved_106>", "<reserved_107>"]) == [195, 196]
    assert real_tokenizer.convert_ids_to_tokens([195, 196]) == ["<reserved_106>", "<reserved_107>"]
    assert real_tokenizer.encode("<reserved_106>你好<reserved_107>") == [195, 16829, 196]
    assert (real_tokenizer.unk_token_id, real_tokenizer.bos_token_id, real_tokenizer.eos_token_id) == (0, 1, 2)
    assert real_tokenizer.pad_token_id == 0
    # Special-token strings in the text become their single ids, as in the official tokenizer.
    assert real_tokenizer.encode("你好</s>") == [16829, 2]
    ids = [195, 16829, 196, 2]
    assert real_tokenizer.decode(ids) == "<reserved_106>你好<reserved_107></s>"
    assert real_tokenizer.decode(ids, skip_special_tokens=True) == "<reserved_106>你好<reserved_107>"
    # Byte fallback pieces decode to the character they spell.
    emoji_ids = real_tokenizer.encode("🧌")
    assert real_tokenizer.convert_ids_to_tokens(emoji_ids) == ["<0xF0>", "<0x9F>", "<0xA7>", "<0x8C>"]
    assert real_tokenizer.decode(emoji_ids) == "🧌"
    broken = emoji_ids[:2] + [16829]  # an incomplete byte sequence decodes as sentencepiece does
    assert real_tokenizer.decode(broken) == sp_processor(REAL_TOKENIZER).decode(broken) == "\ufffd\ufffd你好"


@requires_real_tokenizer
def test_real_no_bos_eos_by_default_and_optional(real_tokenizer):
    assert real_tokenizer.add_bos_token is False and real_tokenizer.add_eos_token is False
    plain = sp_processor(REAL_TOKENIZER).encode("你好")
    assert real_tokenizer("你好")["input_ids"] == plain
    both = BaichuanTokenizer(vocab_file=str(REAL_TOKENIZER), add_bos_token=True, add_eos_token=True)
    assert both("你好")["input_ids"] == [1] + plain + [2]
    assert both.encode("你好", add_special_tokens=False) == plain
    assert both.get_special_tokens_mask(plain) == [1] + [0] * len(plain) + [1]


def check_save_load(tokenizer_path, tmp_path, text):
    """Defaults, and add_bos/add_eos/padding_side set, survive save_pretrained/from_pretrained."""
    plain = sp_processor(tokenizer_path).encode(text)
    for kwargs, expected in [
        ({}, plain),
        ({"add_bos_token": True, "add_eos_token": True, "padding_side": "left"}, [1] + plain + [2]),
        ({"add_bos_token": True, "padding_side": "left"}, [1] + plain),
    ]:
        tokenizer = BaichuanTokenizer(vocab_file=str(tokenizer_path), **kwargs)
        out = tmp_path / ("_".join(kwargs) or "defaults")
        tokenizer.save_pretrained(out)
        saved = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert saved["add_bos_token"] is kwargs.get("add_bos_token", False)
        assert saved["add_eos_token"] is kwargs.get("add_eos_token", False)
        assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
        for loaded in (BaichuanTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out)):
            assert type(loaded) is BaichuanTokenizer
            assert loaded.add_bos_token is kwargs.get("add_bos_token", False)
            assert loaded.add_eos_token is kwargs.get("add_eos_token", False)
            assert loaded.padding_side == kwargs.get("padding_side", "right")
            assert loaded(text)["input_ids"] == expected
    # Left padding with the pad id 0, as the chat batch generation needs.
    short = loaded("你好")["input_ids"]
    batch = loaded(["你好", text], padding=True)
    pad = len(expected) - len(short)
    assert pad > 0
    assert batch["input_ids"] == [[0] * pad + short, expected]
    assert batch["attention_mask"][0] == [0] * pad + [1] * len(short)


@requires_real_tokenizer
def test_real_save_load_keeps_settings(tmp_path):
    check_save_load(REAL_TOKENIZER, tmp_path, "你好，世界 hello 123")


@requires_real_tokenizer
def test_auto_tokenizer_loads_official_files():
    tokenizer = AutoTokenizer.from_pretrained(SHARED)  # the published tokenizer_config.json
    assert type(tokenizer) is BaichuanTokenizer
    assert tokenizer.model_max_length == 4096
    assert tokenizer.add_bos_token is False and tokenizer.add_eos_token is False
    assert tokenizer.encode("你好 <reserved_106>") == sp_processor(REAL_TOKENIZER).encode("你好 <reserved_106>")


@requires_real_tokenizer
def test_pickle_round_trip(real_tokenizer):
    clone = pickle.loads(pickle.dumps(real_tokenizer))
    assert clone.encode(TEXTS[6]) == real_tokenizer.encode(TEXTS[6])
    forged = "a<reserved_107>b</s>"
    real_tokenizer.encode(forged, split_special_tokens=True)  # builds the text view, which is not pickled
    clone = pickle.loads(pickle.dumps(real_tokenizer))
    assert clone.encode(forged, split_special_tokens=True) == real_tokenizer.encode(forged, split_special_tokens=True)


def sp_as_text(path) -> spm.SentencePieceProcessor:
    """The reference for split_special_tokens: sentencepiece with every <reserved_N> piece a control
    symbol, which it never produces from text (as it treats </s>)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for piece in proto.pieces:
        if piece.piece.startswith("<reserved_"):
            piece.type = piece.CONTROL
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@pytest.mark.parametrize("which", ["tiny", pytest.param("real", marks=requires_real_tokenizer)])
def test_split_special_tokens_encodes_special_strings_as_text(which, tiny_model_dir):
    path = REAL_TOKENIZER if which == "real" else tiny_model_dir / "tokenizer.model"
    text = "<s>a<reserved_107>b</s>c<reserved_5><unk>\n<reserved_106>"
    reference = sp_as_text(path).encode(text)
    reserved = set(sp_processor(path).encode("<reserved_106><reserved_107>"))
    assert len(reserved) == 2 and not reserved & set(reference)
    for tokenizer, kwargs in ((BaichuanTokenizer(vocab_file=str(path)), {"split_special_tokens": True}),
                              (BaichuanTokenizer(vocab_file=str(path), split_special_tokens=True), {})):
        ids = tokenizer.encode(text, add_special_tokens=False, **kwargs)
        assert ids == tokenizer(text, **kwargs)["input_ids"] == reference
        assert not {0, 1, 2} & set(ids) and tokenizer.decode(ids) == text
    # by default, as the official tokenizer: the strings are the tokens
    assert {1, 2} | reserved <= set(BaichuanTokenizer(vocab_file=str(path)).encode(text))


# --------------------------------------------------------------------------------------------
# the tiny tokenizer trained on data/sample


def test_tiny_ids_equal_sentencepiece(tiny_tokenizer, tiny_model_dir):
    sp = sp_processor(tiny_model_dir / "tokenizer.model")
    for text in TEXTS + sample_texts()[:40]:
        ids = tiny_tokenizer.encode(text)
        assert ids == sp.encode(text), text
        assert tiny_tokenizer.decode(ids) == text
    # The chat tokens are single user-defined pieces.
    assert tiny_tokenizer.encode("<reserved_106>你好<reserved_107>") == [3] + sp.encode("你好") + [4]
    assert tiny_tokenizer.add_bos_token is False and tiny_tokenizer.add_eos_token is False


def test_tiny_save_load_keeps_settings(tiny_model_dir, tmp_path):
    check_save_load(tiny_model_dir / "tokenizer.model", tmp_path, "你好，俺老孙 hello 123")


def test_auto_tokenizer_loads_tiny_checkpoint(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(tokenizer) is BaichuanTokenizer
    assert tokenizer.model_max_length == 1024
    assert tokenizer.chat_template

"""Write a tiny random-init Baichuan2 checkpoint, for tests and demos without downloads.

    python -m baichuan.tiny --out runs/tiny --corpus data/sample/rolebench-zh_general_train.jsonl
    python -m baichuan.tiny --out runs/tiny-real-vocab --tokenizer ../shared/baichuan2/tokenizer.model

With `--corpus`, a small sentencepiece BPE model (byte fallback, identity normalisation, the
two chat tokens as user-defined symbols) is trained on the file's lines. With `--tokenizer`, an
existing `tokenizer.model` (the real Baichuan2 one) is copied. The chat token ids are written
into the generation config either way.
"""

import argparse
import io
import os
import sys
import tempfile

import sentencepiece as spm
import torch
from transformers import GenerationConfig

from . import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer
from .generation_utils import chat_template

USER_TOKEN = "<reserved_106>"
ASSISTANT_TOKEN = "<reserved_107>"


def train_sentencepiece(corpus_path: str, vocab_size: int) -> bytes:
    with open(corpus_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{corpus_path}: the corpus is empty")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # "▁" must be a piece even when the corpus has no spaces: byte-fallback bytes of it
        # would decode to a literal "▁" instead of a space.
        required_chars="\u2581",
        split_digits=True,
        user_defined_symbols=[USER_TOKEN, ASSISTANT_TOKEN],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def make_tiny(
    out_dir: str,
    tokenizer_model: bytes,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 172,
    position_embedding: str = "rope",
    model_max_length: int = 1024,
    seed: int = 0,
) -> None:
    """Write config, safetensors weights, tokenizer, generation config and code files to `out_dir`."""
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path = os.path.join(scratch, "tokenizer.model")
        with open(vocab_path, "wb") as f:
            f.write(tokenizer_model)
        tokenizer = BaichuanTokenizer(vocab_file=vocab_path, model_max_length=model_max_length)
        user_id, assistant_id = tokenizer.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN])
        config = BaichuanConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            position_embedding=position_embedding,
            max_position_embeddings=model_max_length,
            model_max_length=model_max_length,
        )
        generation_config = GenerationConfig(
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            user_token_id=user_id,
            assistant_token_id=assistant_id,
            max_new_tokens=64,
            do_sample=True,
            temperature=0.3,
            top_k=5,
            top_p=0.85,
            repetition_penalty=1.05,
        )
        torch.manual_seed(seed)
        model = BaichuanForCausalLM(config)
        model.generation_config = generation_config
        tokenizer.chat_template = chat_template(tokenizer, generation_config)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="an existing sentencepiece tokenizer.model to use as is")
    source.add_argument("--corpus", help="a UTF-8 text file to train a small sentencepiece BPE model on")
    parser.add_argument("--vocab_size", type=int, default=1200, help="target vocabulary size with --corpus")
    parser.add_argument("--hidden_size", type=int, default=64, help="model width")
    parser.add_argument("--num_layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads (must divide hidden_size)")
    parser.add_argument("--intermediate_size", type=int, default=172, help="MLP width")
    parser.add_argument("--position_embedding", choices=["rope", "alibi"], default="rope", help="7B-style or 13B-style")
    parser.add_argument("--model_max_length", type=int, default=1024, help="context length")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    try:
        if args.tokenizer:
            with open(args.tokenizer, "rb") as f:
                tokenizer_model = f.read()
        else:
            tokenizer_model = train_sentencepiece(args.corpus, args.vocab_size)
        make_tiny(
            args.out,
            tokenizer_model,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            position_embedding=args.position_embedding,
            model_max_length=args.model_max_length,
            seed=args.seed,
        )
    except (OSError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote a tiny Baichuan2 ({args.hidden_size} wide, {args.num_layers} layers) to {args.out}")


if __name__ == "__main__":
    main()

"""Write a tiny random-init Baichuan2 checkpoint, for tests and demos without downloads.

    python -m baichuan.tiny --out runs/tiny --corpus data/sample/rolebench-zh_general_train.jsonl
    python -m baichuan.tiny --out runs/tiny-real-vocab --tokenizer ../shared/baichuan2/tokenizer.model
A tiny base that has read the corpus (a short full-parameter pretraining), for LoRA to shape:
    python -m baichuan.tiny --out runs/tiny-lm --corpus runs/quickstart/train.jsonl --pretrain_steps 300

With `--corpus`, a small sentencepiece BPE model (byte fallback, identity normalisation, the
two chat tokens as user-defined symbols) is trained on the corpus texts: the lines of a text
file, or the strings of each row of a jsonl file (data_helper.py's output), each text once. With
`--tokenizer`, an existing `tokenizer.model` (the real Baichuan2 one) is copied. The chat token
ids are written into the generation config either way.

With `--pretrain_steps N`, the random weights are first trained for N AdamW steps on the corpus
texts as plain language modelling (each text followed by eos, concatenated and cut into blocks),
seeded and deterministic. A fine-tune of random weights can only learn noise; real Baichuan2 is
a language model before anyone puts LoRA on it, and this makes the tiny one a small one.
"""

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time

import sentencepiece as spm
import torch
from transformers import GenerationConfig

from utils.files import atomic_directory

from . import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer
from .generation_utils import chat_template

USER_TOKEN = "<reserved_106>"
ASSISTANT_TOKEN = "<reserved_107>"


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for item in value for s in _strings(item)] if isinstance(value, list) else []


def corpus_texts(corpus_path: str) -> list[str]:
    """The texts of a corpus, in order: a text file's lines, or a jsonl file's strings (every string
    of every row, each once: data_helper.py repeats a role's system prompt in every row)."""
    texts = []
    with open(corpus_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if corpus_path.endswith(".jsonl"):
                try:
                    texts += _strings(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{corpus_path}:{number}: not valid JSON ({error.msg})") from None
            else:
                texts.append(line.rstrip("\n"))
    if corpus_path.endswith(".jsonl"):
        texts = list(dict.fromkeys(texts))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{corpus_path}: the corpus is empty")
    return texts


def train_sentencepiece(corpus_path: str, vocab_size: int) -> bytes:
    lines = corpus_texts(corpus_path)
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


def pretrain(model, tokenizer, texts: list[str], steps: int, block_size: int = 128, batch_size: int = 16,
             learning_rate: float = 3e-3, seed: int = 0) -> list[float]:
    """Full-parameter language modelling on `texts` for `steps` AdamW steps; returns the losses.

    Each text is followed by eos and all are concatenated; every batch takes `batch_size` blocks
    at offsets drawn from a generator seeded with `seed`, so the run is deterministic. The rate
    warms up over the first 5% of the steps, then follows a cosine down to a tenth.
    """
    stream = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    block_size = min(block_size, len(stream) - 1)
    stream = torch.tensor(stream)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def rate(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - block_size + 1, (batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + block_size] for s in starts.tolist()])  # (batch, block)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


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
    corpus: list[str] | None = None,
    pretrain_steps: int = 0,
) -> list[float]:
    """Write config, safetensors weights, tokenizer, generation config and code files to `out_dir`
    (replaced whole when it exists), with the umask's normal permissions;
    with `pretrain_steps`, the weights are first trained on the `corpus` texts (`pretrain`), and
    the losses are returned."""
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
        losses = pretrain(model, tokenizer, corpus, pretrain_steps, seed=seed) if pretrain_steps else []
        model.generation_config = generation_config
        tokenizer.chat_template = chat_template(tokenizer, generation_config)
        # through a temporary folder that gets the umask's modes: transformers writes the weights
        # 0600, which on a shared server nobody else could read; and a crash leaves no half a model
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return losses


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the pretraining")
    parser.add_argument("--pretrain_steps", type=int, default=0,
                        help="full-parameter language-model steps on the --corpus texts before saving (0: none)")
    args = parser.parse_args(argv)
    if args.pretrain_steps < 0 or (args.pretrain_steps and not args.corpus):
        parser.error("--pretrain_steps takes a count of at least 0, and needs --corpus")
    try:
        corpus = None
        if args.tokenizer:
            with open(args.tokenizer, "rb") as f:
                tokenizer_model = f.read()
        else:
            corpus = corpus_texts(args.corpus)
            tokenizer_model = train_sentencepiece(args.corpus, args.vocab_size)
        start = time.perf_counter()
        losses = make_tiny(
            args.out,
            tokenizer_model,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            position_embedding=args.position_embedding,
            model_max_length=args.model_max_length,
            seed=args.seed,
            corpus=corpus,
            pretrain_steps=args.pretrain_steps,
        )
    except (OSError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    if losses:
        print(f"pretrained {args.pretrain_steps} steps on {len(corpus)} texts of {args.corpus} in "
              f"{time.perf_counter() - start:.0f} s: loss {losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f}")
    print(f"wrote a tiny Baichuan2 ({args.hidden_size} wide, {args.num_layers} layers) to {args.out}")


if __name__ == "__main__":
    main()

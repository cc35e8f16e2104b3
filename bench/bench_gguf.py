"""GGUF round trip of a merged tiny Baichuan2: merge_params.py --format llama -> llama.cpp's
convert_hf_to_gguf.py -> llama-cpp-python, against our own model.

    bash bench/bench_gguf.sh                  # builds llama-cpp-python from its sdist, then runs this
    python bench/bench_gguf.py --llama_cpp_dir /path/to/llama.cpp   # llama_cpp already importable

`--llama_cpp_dir` is a llama.cpp source tree (the one vendored in the llama-cpp-python sdist
will do): its convert_hf_to_gguf.py runs with its gguf-py on PYTHONPATH. Steps:

1. a tiny rotary Baichuan2 and a random LoRA adapter on all its linear layers;
2. merge_params.py --format llama; the reference is base + adapter merged in this process;
3. GGUF as f32 and f16, then Q8_0 and Q4_K_M with llama.cpp's quantizer (`llama_model_quantize`);
4. for each: logits of a few chat prompts (max abs difference, argmax agreement), and greedy
   replies token by token against ours; the chat template stored in the GGUF, rendered the way
   llama-cpp-python renders it, must give build_chat_input's ids;
5. llama.cpp's tokenizer against sentencepiece: the tiny vocabulary, and the real Baichuan2 one
   (a vocabulary-only GGUF) over RoleBench's texts when ../shared has them.

Prints a markdown table. Exit status 1 if f32 misses 1e-2 or a tokenizer check fails.
"""

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")

CONVERSATIONS = [
    [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    [{"role": "system", "content": "你是孙悟空，说话豪爽。"}, {"role": "user", "content": "师父被妖怪抓走了，怎么办？"}],
    [
        {"role": "system", "content": "You are Sherlock Holmes."},
        {"role": "user", "content": "What do you see on my coat?"},
        {"role": "assistant", "content": "Mud, of a reddish tint. 123 456."},
        {"role": "user", "content": "And what does it tell you?  "},
    ],
]
TOKENIZER_TEXTS = [
    "你好，世界！今天天气怎么样？", "Hello world, how are you doing today?", "1234567890 3.14159 2024年10月1日",
    "😀🤖👍🏽 emoji 🀄 🧌🪿", "a    b\t\tc\n\nd   \n  ", "  leading and trailing spaces  ",
    "混合 mixed 文本 123 😀\n\t结束。", "ﬁ ＡＢＣ ① ㍿ \u200b", " ", "\n", "a...b 。。。 <br> ``` <!-- x --> ---",
    "<reserved_106>你好<reserved_107>", "这本书 一读再读，他 高声大叫",
]  # fmt: skip


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama_cpp_dir", required=True, help="llama.cpp source tree with convert_hf_to_gguf.py")
    parser.add_argument("--work_dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--hidden_size", type=int, default=256, help="model width (K-quants need a multiple of 256)")
    parser.add_argument("--num_layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads")
    parser.add_argument("--intermediate_size", type=int, default=768, help="MLP width")
    parser.add_argument("--new_tokens", type=int, default=24, help="greedy reply length compared")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument(
        "--real_tokenizer", default=os.path.join(SHARED, "baichuan2", "tokenizer.model"),
        help="the real Baichuan2 tokenizer.model for the vocabulary check (skipped if missing)",
    )  # fmt: skip
    parser.add_argument(
        "--corpus", default=os.path.join(SHARED, "rolebench", "*.jsonl"),
        help="glob of RoleBench-shaped jsonl files whose texts the real-vocabulary check encodes",
    )  # fmt: skip
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.llama_cpp_dir, "convert_hf_to_gguf.py")):
        parser.error(f"--llama_cpp_dir: {args.llama_cpp_dir!r} has no convert_hf_to_gguf.py")
    return args


def run(command, env=None, timeout=900):
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def make_models(args, work):
    """Tiny base, a random LoRA adapter, and the reference: the two merged here."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from baichuan import BaichuanForCausalLM, BaichuanTokenizer
    from baichuan.tiny import make_tiny, train_sentencepiece

    corpus = os.path.join(REPO_ROOT, "data", "sample", "rolebench-zh_general_train.jsonl")
    make_tiny(os.path.join(work, "base"), train_sentencepiece(corpus, 1200), hidden_size=args.hidden_size,
              num_layers=args.num_layers, num_heads=args.num_heads, intermediate_size=args.intermediate_size)  # fmt: skip
    torch.manual_seed(1)
    base = BaichuanForCausalLM.from_pretrained(os.path.join(work, "base"))
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                      target_modules=["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    get_peft_model(base, lora).save_pretrained(os.path.join(work, "adapter"))
    base = BaichuanForCausalLM.from_pretrained(os.path.join(work, "base"))
    reference = PeftModel.from_pretrained(base, os.path.join(work, "adapter")).merge_and_unload().eval()
    return reference, BaichuanTokenizer.from_pretrained(os.path.join(work, "base"))


def convert(args, model_dir, out, outtype, *extra):
    env = dict(os.environ, PYTHONPATH=os.path.join(args.llama_cpp_dir, "gguf-py"))
    script = os.path.join(args.llama_cpp_dir, "convert_hf_to_gguf.py")
    return run([sys.executable, script, model_dir, "--outfile", out, "--outtype", outtype, *extra], env=env)


def quantize(source, out, ftype, threads):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize failed for {out}")
    return time.perf_counter() - start


def greedy_llama_cpp(llm, prompt, new_tokens, eos):
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    reply = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        reply.append(token)
        llm.eval([token])
    return reply


def compare_gguf(path, prompts, ours, ours_replies, args, kv_f32=False):
    """(max abs logit difference, argmax agreement, replies equal) over the prompts."""
    import llama_cpp
    import numpy as np

    extra = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    llm = llama_cpp.Llama(path, logits_all=True, n_ctx=512, n_threads=args.threads, verbose=False, **extra)
    worst, agree, total, same = 0.0, 0, 0, 0
    for prompt, logits, reply in zip(prompts, ours, ours_replies):
        llm.reset()
        llm.eval(prompt)
        got = np.array(llm.scores[: len(prompt)])  # (q, vocab)
        worst = max(worst, float(np.abs(got - logits).max()))
        agree += int((got.argmax(-1) == logits.argmax(-1)).sum())
        total += len(prompt)
        same += greedy_llama_cpp(llm, prompt, args.new_tokens, llm.token_eos()) == reply
    template_ok = all(
        llm.tokenize(render_template(llm, c).encode(), add_bos=False, special=True) == p
        for c, p in zip(CONVERSATIONS, prompts)
    )
    return worst, agree / total, f"{same}/{len(prompts)}", template_ok


def render_template(llm, messages):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    return formatter(messages=messages).prompt


def tokenizer_mismatches(gguf_path, sp_path, texts):
    import llama_cpp
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_path)
    llm = llama_cpp.Llama(gguf_path, vocab_only=True, verbose=False)
    bad = sum(llm.tokenize(t.encode(), add_bos=False, special=False) != sp.encode(t) for t in texts)
    bad_decode = sum(llm.detokenize(sp.encode(t)).decode("utf-8", "replace") != t for t in texts)
    return bad, bad_decode


def corpus_texts(pattern):
    texts = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [t for t in [row.get("question", ""), *row.get("generated", [])] if t]
    return texts


def real_vocab_check(args, work):
    """A one-layer model on the real vocabulary, exported and converted vocabulary-only."""
    from baichuan import BaichuanForCausalLM, BaichuanTokenizer
    from baichuan.convert_llama import save_as_llama
    from baichuan.tiny import make_tiny

    with open(args.real_tokenizer, "rb") as f:
        make_tiny(os.path.join(work, "real-base"), f.read(), hidden_size=64, num_layers=1)
    model = BaichuanForCausalLM.from_pretrained(os.path.join(work, "real-base"))
    save_as_llama(model, BaichuanTokenizer.from_pretrained(os.path.join(work, "real-base")), os.path.join(work, "real-llama"))
    gguf_path = os.path.join(work, "real-vocab.gguf")
    convert(args, os.path.join(work, "real-llama"), gguf_path, "f16", "--vocab-only")
    texts = TOKENIZER_TEXTS + corpus_texts(args.corpus)
    return len(texts), *tokenizer_mismatches(gguf_path, args.real_tokenizer, texts)


def reference_outputs(reference, tokenizer, new_tokens):
    """Chat prompt ids, our logits of each, and our greedy replies (eos dropped)."""
    import torch

    from baichuan.generation_utils import build_chat_input

    config = reference.generation_config
    prompts = [build_chat_input(tokenizer, c, config, 1024, new_tokens) for c in CONVERSATIONS]
    logits, replies = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits.append(reference(input_ids=ids).logits[0].numpy())  # (q, vocab)
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     repetition_penalty=1.0, max_new_tokens=new_tokens)  # fmt: skip
            replies.append([t for t in out[0, len(prompt) :].tolist() if t != config.eos_token_id])
    return prompts, logits, replies


def make_ggufs(args, merged, work):
    """f32 and f16 by the converter, Q8_0 and Q4_K_M quantised from f32: paths and seconds taken."""
    import llama_cpp

    paths = {name: os.path.join(work, f"tiny-{name}.gguf") for name in ("f32", "f16", "Q8_0", "Q4_K_M")}
    seconds = {"f32": convert(args, merged, paths["f32"], "f32"), "f16": convert(args, merged, paths["f16"], "f16")}
    seconds["Q8_0"] = quantize(paths["f32"], paths["Q8_0"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, args.threads)
    seconds["Q4_K_M"] = quantize(paths["f32"], paths["Q4_K_M"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, args.threads)
    return paths, seconds


def main():
    args = parse_args()
    sys.path.insert(0, REPO_ROOT)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-gguf-")
    os.makedirs(work, exist_ok=True)

    reference, tokenizer = make_models(args, work)
    merged = os.path.join(work, "llama")
    merge_s = run([sys.executable, "merge_params.py", "--ori_model_dir", os.path.join(work, "base"), "--model_dir",
                   os.path.join(work, "adapter"), "--save_model_dir", merged, "--format", "llama"])  # fmt: skip
    prompts, ours, replies = reference_outputs(reference, tokenizer, args.new_tokens)
    paths, seconds = make_ggufs(args, merged, work)

    import numpy as np

    top2 = np.sort(np.concatenate(ours), axis=-1)[:, -2:]  # (positions, 2)
    print(f"tiny model: hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, "
          f"vocab {reference.config.vocab_size}; merge_params.py --format llama: {merge_s:.1f} s; "
          f"prompts {[len(p) for p in prompts]} tokens, {args.new_tokens} greedy tokens each; our logits: "
          f"max |x| {np.abs(np.concatenate(ours)).max():.2f}, median top-1 - top-2 gap "
          f"{np.median(top2[:, 1] - top2[:, 0]):.3f}")  # fmt: skip
    print("\n| GGUF | KV cache | size, MiB | made in, s | max abs logit diff | argmax agreement "
          "| greedy replies equal | chat template ids |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for name, kv_f32 in [("f32", False), ("f32", True), ("f16", False), ("Q8_0", False), ("Q4_K_M", False)]:
        worst, agreement, same, template_ok = compare_gguf(paths[name], prompts, ours, replies, args, kv_f32)
        size = os.path.getsize(paths[name]) / 2**20
        print(f"| {name} | {'f32' if kv_f32 else 'f16 (default)'} | {size:.2f} | {seconds[name]:.1f} | {worst:.2e} "
              f"| {agreement:.1%} | {same} | {'equal' if template_ok else 'DIFFERENT'} |")  # fmt: skip
        failed |= (name == "f32" and (worst > 1e-2 or agreement < 1)) or not template_ok

    bad, bad_decode = tokenizer_mismatches(paths["f32"], os.path.join(merged, "tokenizer.model"), TOKENIZER_TEXTS)
    print(f"\nllama.cpp tokenizer vs sentencepiece, tiny vocabulary: {len(TOKENIZER_TEXTS)} texts, {bad} encode and "
          f"{bad_decode} decode mismatches")  # fmt: skip
    failed |= bool(bad or bad_decode)
    if os.path.isfile(args.real_tokenizer):
        n, bad, bad_decode = real_vocab_check(args, work)
        print(f"llama.cpp tokenizer vs sentencepiece, real Baichuan2 vocabulary: {n} texts, {bad} encode and "
              f"{bad_decode} decode mismatches")  # fmt: skip
        failed |= bool(bad or bad_decode)
    else:
        print(f"real vocabulary check skipped: {args.real_tokenizer} is missing")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

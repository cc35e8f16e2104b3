"""merge_params.py --format llama (baichuan/convert_llama.py) and the Baichuan-format merge's
normalised head, on the tiny model with a random LoRA adapter. References: the base and the
adapter merged in this process, run by our BaichuanForCausalLM, and sentencepiece itself."""

import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from baichuan import BaichuanForCausalLM, BaichuanTokenizer
from baichuan.convert_llama import save_as_llama, save_llama_tokenizer
from baichuan.generation_utils import build_chat_input
from conftest import REPO_ROOT
from helpers import assert_one_line_error

LINEAR = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = [
    "你好，世界！今天天气怎么样？",
    "Hello world, how are you doing today?",
    "1234567890 3.14159 2024年10月1日",
    "😀🤖👍🏽 emoji 🀄 🧌🪿",  # the last two are not in the real vocabulary: byte fallback
    "a    b\t\tc\n\nd   \n  ",
    "  leading and trailing spaces  ",
    "混合 mixed 文本 123 😀\n\t结束。",
    "ﬁ ＡＢＣ ① ㍿ \u200b",  # identity normalisation
    " ",
    "\n",
    "a...b 。。。 <br> ``` <!-- x --> --- <SEP>",  # user-defined pieces, kept whole
    # a space before pieces that Baichuan2 appended to its vocabulary (ids >= 99968): transformers'
    # LlamaTokenizer ranks merges by id, not score, and splits these differently from sentencepiece
    "这本书 一读再读，他 高声大叫",
    "2. 大葱",
]
SPECIAL_TEXTS = ["<reserved_106>你好<reserved_107>", "你好</s>", "<s>x<unk>"]


def run(args, cwd=REPO_ROOT, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def make_adapter(base_dir, out_dir, seed=0):
    """A LoRA adapter with random A and B, so that merging it changes every linear layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = BaichuanForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, target_modules=LINEAR)).save_pretrained(out_dir)


def merge_command(base, adapter, out, *extra):
    return [sys.executable, "merge_params.py", "--ori_model_dir", str(base), "--model_dir", str(adapter),
            "--save_model_dir", str(out), "--device", "-1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-adapter")
    make_adapter(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dir):
    from peft import PeftModel

    base = BaichuanForCausalLM.from_pretrained(tiny_model_dir)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir, tmp_path_factory):
    """{"llama": ..., "baichuan": ...}: merge_params.py's output in each format (run side by side)."""
    root = tmp_path_factory.mktemp("export-merged")
    procs = {
        fmt: subprocess.Popen(merge_command(tiny_model_dir, adapter_dir, root / fmt, "--format", fmt), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for fmt in ("llama", "baichuan")
    }  # fmt: skip
    for proc in procs.values():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    return {fmt: root / fmt for fmt in procs}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return BaichuanTokenizer.from_pretrained(tiny_model_dir)


# Runs where the repository is not importable: loads the export with plain transformers, records
# the files of the export that Python opens and every class an unpickler looks up, and prints
# the logits of the batch argv[2].
STANDALONE = """
import json, os, sys
export = os.path.realpath(sys.argv[1])
opened, unpickled = set(), []
def audit(event, args):
    if event == "open" and isinstance(args[0], str) and os.path.realpath(args[0]).startswith(export + os.sep):
        opened.add(os.path.basename(args[0]))
    elif event == "pickle.find_class":
        unpickled.append(args)
sys.addaudithook(audit)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(export).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"model": type(model).__name__, "tokenizer_eos": tokenizer.eos_token_id, "opened": sorted(opened),
                  "unpickled": [repr(a) for a in unpickled], "ours_imported": "baichuan" in sys.modules,
                  "logits": logits.tolist()}))
"""


def test_llama_export_loads_alone_and_gives_our_logits(merged, reference, tiny_tokenizer, tmp_path):
    export = merged["llama"]
    names = set(os.listdir(export))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json"} <= names  # fmt: skip
    assert all(name.endswith((".json", ".safetensors", ".model")) for name in names), names  # no .bin, no code
    umask = os.umask(0)
    os.umask(umask)
    for fmt in ("llama", "baichuan"):  # safetensors alone would make its files 0600
        assert {oct(os.stat(p).st_mode & 0o777) for p in merged[fmt].iterdir()} == {oct(0o666 & ~umask)}, fmt
    assert "auto_map" not in (export / "config.json").read_text()
    ids = [tiny_tokenizer.encode(text) for text in ("俺老孙来也！你是谁？", "Hello, how are you?")]
    width = min(map(len, ids))
    batch = [row[:width] for row in ids]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run([sys.executable, "-c", STANDALONE, str(export), json.dumps(batch)], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "LlamaForCausalLM" and out["tokenizer_eos"] == 2
    assert not out["ours_imported"] and out["unpickled"] == []
    # Python-level opens only (safetensors and tokenizers read their files in Rust): nothing else
    assert all(name.endswith((".json", ".safetensors", ".model")) for name in out["opened"]), out["opened"]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(batch)).logits
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=0, atol=1e-5)


def test_llama_export_left_padded_batch(merged, reference, tiny_tokenizer):
    llama = LlamaForCausalLM.from_pretrained(merged["llama"]).eval()
    rows = [tiny_tokenizer.encode(text) for text in ("你好", "师父被妖怪抓走了，怎么办？ 123")]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    # generate() gives left-padded rows these positions; both models then see each row as if alone
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        got = llama(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        expected = reference(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        alone = reference(input_ids=torch.tensor([rows[0]])).logits[0]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[0, -len(rows[0]) :], alone, rtol=0, atol=1e-5)


def test_llama_export_chat_template_and_greedy_reply_equal_ours(merged, reference, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "你是孙悟空，说话豪爽。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "俺老孙来也！"},
        {"role": "user", "content": " 师父呢？ 2. 大葱"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(merged["llama"])
    llama = LlamaForCausalLM.from_pretrained(merged["llama"]).eval()
    config = llama.generation_config
    assert (config.eos_token_id, config.user_token_id, config.assistant_token_id) == (2, 3, 4)

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected_prompt = build_chat_input(tiny_tokenizer, messages, reference.generation_config, 1024, 24)
    assert prompt == expected_prompt
    ids = torch.tensor([prompt])
    greedy = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": 24}  # the rest: the configs
    with torch.no_grad():
        got = llama.generate(ids, **greedy)[0, len(prompt) :].tolist()
        expected = reference.generate(ids, **greedy)[0, len(prompt) :].tolist()
    assert got == expected and len(got) >= 8


@pytest.mark.parametrize("vocab", ["tiny", "real"])
def test_exported_tokenizer_gives_sentencepiece_ids(vocab, tiny_model_dir, request, tmp_path):
    if vocab == "real":
        ours = BaichuanTokenizer(vocab_file=str(request.getfixturevalue("real_tokenizer_path")))
        chat = GenerationConfig(user_token_id=195, assistant_token_id=196)
    else:
        ours = BaichuanTokenizer.from_pretrained(tiny_model_dir)
        chat = GenerationConfig.from_pretrained(tiny_model_dir)
    save_llama_tokenizer(ours, chat, str(tmp_path), 4096)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert "Baichuan" not in type(exported).__name__
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in TEXTS:
        ids = exported.encode(text)
        assert ids == sp.encode(text), text
        assert exported.decode(ids) == text
    # special-token text becomes the token itself, as with our tokenizer (sentencepiece spells it out)
    for text in SPECIAL_TEXTS:
        assert exported.encode(text) == ours.encode(text), text
        assert exported.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text), skip_special_tokens=True)
    assert (exported.unk_token_id, exported.bos_token_id, exported.eos_token_id, exported.pad_token_id) == (0, 1, 2, 0)
    assert exported.model_max_length == 4096


def test_baichuan_merge_stores_unit_head_rows_and_same_logits(merged, reference, tiny_tokenizer):
    model = BaichuanForCausalLM.from_pretrained(merged["baichuan"]).eval()
    norms = torch.linalg.vector_norm(model.lm_head.weight, dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    before = torch.linalg.vector_norm(reference.lm_head.weight, dim=-1)
    assert (before - 1).abs().min() > 0.5  # the random-init head was far from unit rows
    ids = torch.tensor([tiny_tokenizer.encode("俺老孙来也！你是谁？")])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_save_as_llama_keeps_other_files_in_the_directory(reference, tiny_tokenizer, tmp_path):
    (tmp_path / "roleplay.json").write_text('{"role": "孙悟空"}', encoding="utf-8")
    save_as_llama(reference, tiny_tokenizer, str(tmp_path))
    assert (tmp_path / "roleplay.json").read_text(encoding="utf-8") == '{"role": "孙悟空"}'
    assert (tmp_path / "model.safetensors").is_file()


def test_llama_format_refuses_an_alibi_model(tiny_tokenizer_model, tmp_path):
    from baichuan.tiny import make_tiny

    make_tiny(str(tmp_path / "base"), tiny_tokenizer_model, position_embedding="alibi")
    make_adapter(tmp_path / "base", tmp_path / "adapter")
    proc = run(merge_command(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "--format", "llama"))
    assert proc.returncode == 1
    assert_one_line_error(proc, "--format llama", "ALiBi")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_llama_conversion_and_the_config_tell_alibi_from_rope_alike():
    """An official config read by its own remote code has no position_embedding: the conversion
    then decides by width exactly as BaichuanConfig does."""
    from types import SimpleNamespace

    from baichuan import BaichuanConfig
    from baichuan.convert_llama import check_convertible

    for width, heads in ((4096, 32), (5120, 40)):
        ours = BaichuanConfig(hidden_size=width, num_attention_heads=heads)
        for config in (ours, SimpleNamespace(hidden_size=width)):
            if ours.position_embedding == "alibi":
                with pytest.raises(ValueError, match="ALiBi"):
                    check_convertible(config)
            else:
                check_convertible(config)
    assert [BaichuanConfig(hidden_size=w, num_attention_heads=40).position_embedding for w in (5120, 2560)] == [
        "alibi", "rope"]
    check_convertible(SimpleNamespace(hidden_size=5120, position_embedding="rope"))  # the field wins over the width

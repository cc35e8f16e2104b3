"""Tests of baichuan/modeling_baichuan.py and configuration_baichuan.py.

References: transformers' own LlamaForCausalLM with the same weights (the 7B architecture is
Llama's, apart from the fused W_pack and the normalised head), a hand-written eager attention
with the ALiBi bias (13B), plain full-logits cross-entropy for the chunked loss, and the
official checkpoint names and config.json facts.
"""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

from baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer
from baichuan import modeling_baichuan
from baichuan.convert_llama import to_llama
from baichuan.modeling_baichuan import alibi_slopes

VOCAB = 1000


def tiny_config(**overrides) -> BaichuanConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        model_max_length=256,
    )
    values.update(overrides)
    return BaichuanConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> BaichuanForCausalLM:
    torch.manual_seed(seed)
    return BaichuanForCausalLM(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (pad 0) and attention_mask for 1-d id tensors of different lengths."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------
# 1. rotary (7B) path == transformers' Llama with the same weights


def llama_twin(model: BaichuanForCausalLM, attn_implementation: str) -> LlamaForCausalLM:
    """transformers' own Llama with the same weights (baichuan.convert_llama: W_pack split into
    q/k/v, head rows L2-normalised), in fp32 on the CPU like `model`."""
    llama = to_llama(model, attn_implementation)
    assert llama.config._attn_implementation == attn_implementation
    return llama


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rope_logits_equal_llama(attn_implementation):
    model = tiny_model()
    assert model.config.position_embedding == "rope"
    llama = llama_twin(model, attn_implementation)
    ids = random_ids(2, 17)
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert ours.shape == theirs.shape == (2, 17, VOCAB)
    assert ours.abs().max() > 0.5  # not a degenerate comparison
    assert max_diff(ours, theirs) <= 1e-5

    # Left padding: positions count real tokens only; Llama gets the same position_ids.
    rows = [random_ids(1, 17, seed=2)[0], random_ids(1, 11, seed=3)[0], random_ids(1, 5, seed=4)[0]]
    ids, mask = left_padded(rows)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = llama(ids, attention_mask=mask, position_ids=position_ids).logits
        for i, row in enumerate(rows):
            real = mask[i].bool()
            assert max_diff(ours[i, real], theirs[i, real]) <= 1e-5
            # ... and equal the row run alone, unpadded.
            alone = model(row[None]).logits[0]
            assert max_diff(ours[i, real], alone) <= 1e-5


# --------------------------------------------------------------------------------------------
# 2. ALiBi (13B) path == a hand-written eager reference


def test_alibi_slopes_hand_computed():
    # Power of two: start = 2 ** (-2 ** -(log2(n) - 3)), slope_i = start ** (i + 1).
    assert alibi_slopes(4) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8], rel=1e-12)
    assert alibi_slopes(8) == pytest.approx([2**-k for k in range(1, 9)], rel=1e-12)
    # 40 heads (Baichuan2-13B): the 32-head series 2**(-k/4), k = 1..32, then every other slope
    # of the 64-head series 2**(-k/8): k = 1, 3, ..., 15.
    slopes = alibi_slopes(40)
    assert len(slopes) == 40
    assert slopes[0] == pytest.approx(0.8408964152537145, rel=1e-12)  # 2 ** -0.25
    assert slopes[31] == pytest.approx(0.00390625, rel=1e-12)  # 2 ** -8
    assert slopes[32] == pytest.approx(0.9170040432046712, rel=1e-12)  # 2 ** -0.125
    assert slopes[39] == pytest.approx(0.2726269331663144, rel=1e-12)  # 2 ** -1.875
    assert slopes == pytest.approx([2 ** (-k / 4) for k in range(1, 33)] + [2 ** (-k / 8) for k in range(1, 16, 2)])
    # 6 heads: 4-head series, then slopes 1 and 3 of the 8-head series.
    assert alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rel=1e-12)


def reference_alibi_logits(model: BaichuanForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one unpadded row (s,) by an eager loop over heads, from the raw weights."""
    config = model.config
    heads, d = config.num_attention_heads, config.head_dim
    slopes = alibi_slopes(heads)
    s = ids.shape[0]
    q_pos = torch.arange(s)[:, None]
    k_pos = torch.arange(s)[None, :]

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    x = model.model.embed_tokens.weight[ids]  # (s, hidden)
    for layer in model.model.layers:
        h = rms(x, layer.input_layernorm.weight)
        q, k, v = (h @ layer.self_attn.W_pack.weight.T).split(config.hidden_size, dim=-1)
        outs = []
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(d) + slopes[head] * (k_pos - q_pos)
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            outs.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        x = x + torch.cat(outs, dim=-1) @ layer.self_attn.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        x = x + (F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    x = rms(x, model.model.norm.weight)
    head_weight = model.lm_head.weight
    return x @ (head_weight / head_weight.norm(dim=-1, keepdim=True)).T


@pytest.mark.parametrize("heads", [4, 6])
def test_alibi_logits_equal_eager_reference(heads):
    model = tiny_model(position_embedding="alibi", num_attention_heads=heads, hidden_size=16 * heads)
    # Slopes of a few heads are small enough that random weights hardly see them; make the
    # positional term dominate so that a wrong sign or offset would show.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.W_pack.weight[: 2 * model.config.hidden_size] *= 0.01
    rows = [random_ids(1, 40, seed=5)[0], random_ids(1, 23, seed=6)[0]]
    with torch.no_grad():
        references = [reference_alibi_logits(model, row) for row in rows]
        for row, reference in zip(rows, references):
            assert max_diff(model(row[None]).logits[0], reference) <= 1e-5
        # Left padding does not shift the ALiBi distances.
        ids, mask = left_padded(rows)
        logits = model(ids, attention_mask=mask).logits
        for i, reference in enumerate(references):
            assert max_diff(logits[i, mask[i].bool()], reference) <= 1e-5
        # The bias matters: rotary positions or none would give other logits.
        no_alibi = copy.deepcopy(model)
        no_alibi.config.position_embedding = "rope"
        assert max_diff(no_alibi(rows[0][None]).logits[0], references[0]) > 1e-3


# --------------------------------------------------------------------------------------------
# 3. greedy generation: KV cache == no cache, padded batch == rows alone


def greedy(model, ids, mask=None, use_cache=True, new_tokens=8):
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, bos_token_id=1, eos_token_id=None
    )
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=config, use_cache=use_cache)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_greedy_generation_cache_and_padding(position_embedding):
    model = tiny_model(seed=3, position_embedding=position_embedding)
    prompt = random_ids(1, 9, seed=7)
    with_cache = greedy(model, prompt)
    assert with_cache.shape == (1, 8)
    assert torch.equal(with_cache, greedy(model, prompt, use_cache=False))

    rows = [random_ids(1, 4, seed=8)[0], random_ids(1, 10, seed=9)[0], random_ids(1, 7, seed=10)[0]]
    ids, mask = left_padded(rows)
    batch_cached = greedy(model, ids, mask)
    batch_uncached = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(batch_cached, batch_uncached)
    alone = torch.cat([greedy(model, row[None]) for row in rows])
    assert torch.equal(batch_cached, alone)
    assert len({tuple(r) for r in alone.tolist()}) > 1  # the rows do differ


# --------------------------------------------------------------------------------------------
# 4. packed rows: segment ids in attention_mask, positions restarting per segment


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_packed_rows_equal_separate_segments(position_embedding):
    model = tiny_model(seed=4, position_embedding=position_embedding)
    ids = random_ids(2, 6, seed=11)
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 3]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 0]])
    with torch.no_grad():
        packed = model(ids, attention_mask=segments, position_ids=position_ids).logits
        for row in range(2):
            for segment in segments[row].unique().tolist():
                if segment == 0:
                    continue
                where = (segments[row] == segment).nonzero().flatten()
                alone = model(ids[row, where][None]).logits[0]
                assert max_diff(packed[row, where], alone) <= 1e-5, (row, segment)
        # Not a vacuous check: read as one sequence, the second segment's logits differ.
        whole = model(ids[:1, :5]).logits[0]
        assert max_diff(whole[3:5], packed[0, 3:5]) > 1e-3


# --------------------------------------------------------------------------------------------
# 5. chunked loss == full-logits cross-entropy, in value and gradients


def reference_loss(model, ids, labels, z_loss_weight=0.0, denominator=None):
    logits = model(ids, use_cache=False).logits.float()  # (b, s, vocab)
    logits, targets = logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    keep = targets != -100
    total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    if z_loss_weight:
        total = total + z_loss_weight * torch.logsumexp(logits[keep], dim=-1).pow(2).sum()
    return total / (denominator if denominator is not None else keep.sum())


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def labelled_batch():
    ids = random_ids(3, 12, seed=12)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, :] = -100  # nothing to learn in this row
    labels[1, 7] = ids[1, 7]
    labels[2, 3:6] = -100
    return ids, labels


@pytest.mark.parametrize(
    "chunk_elements, z_loss_weight, num_items, chunks",
    [
        (2**25, 0.0, None, [16]),
        (3 * VOCAB, 0.0, None, [3, 3, 3, 3, 3, 1]),
        (15 * VOCAB, 0.0, None, [8, 8]),  # split evenly, not 15 + 1
        (1, 0.0, None, [1] * 16),
        (3 * VOCAB, 1e-2, None, [3, 3, 3, 3, 3, 1]),
        (2 * VOCAB, 1e-3, 40, [2] * 8),
    ],
)
def test_chunked_loss_equals_cross_entropy(monkeypatch, chunk_elements, z_loss_weight, num_items, chunks):
    monkeypatch.setattr(modeling_baichuan, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    model = tiny_model(seed=5, z_loss_weight=z_loss_weight)
    ids, labels = labelled_batch()
    calls = []
    original = modeling_baichuan._chunk_logits
    monkeypatch.setattr(modeling_baichuan, "_chunk_logits", lambda h, *a: calls.append(h.shape[0]) or original(h, *a))

    out = model(ids, labels=labels, num_items_in_batch=num_items)
    assert out.logits is None
    assert int((labels[:, 1:] != -100).sum()) == 16
    assert calls == chunks  # the logits of each chunk are computed once: no recomputation in backward
    ours, our_grads = loss_and_grads(model, lambda m: m(ids, labels=labels, num_items_in_batch=num_items).loss)
    assert calls == chunks * 2
    theirs, their_grads = loss_and_grads(model, lambda m: reference_loss(m, ids, labels, z_loss_weight, num_items))
    assert abs(ours.item() - theirs.item()) <= 1e-5
    assert ours.item() > 1.0
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_chunked_loss_gradients_scale_and_add_up():
    """The gradient is computed in the forward pass and only scaled in backward: two losses of
    different batches, weighted and summed before one backward, must still match the reference."""
    model = tiny_model(seed=6, z_loss_weight=1e-3)
    ids, labels = labelled_batch()
    other = random_ids(2, 9, seed=14)
    other_labels = other.clone()
    other_labels[:, :4] = -100

    def ours(m):
        return 3 * m(ids, labels=labels).loss - 0.5 * m(other, labels=other_labels).loss

    def theirs(m):
        return 3 * reference_loss(m, ids, labels, 1e-3) - 0.5 * reference_loss(m, other, other_labels, 1e-3)

    loss, grads = loss_and_grads(model, ours)
    expected_loss, expected = loss_and_grads(model, theirs)
    assert abs(loss.item() - expected_loss.item()) <= 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        assert not model(ids, labels=labels).loss.requires_grad


def test_chunked_loss_frozen_head_and_bf16(monkeypatch):
    monkeypatch.setattr(modeling_baichuan, "LOSS_CHUNK_ELEMENTS", 4 * VOCAB)
    ids, labels = labelled_batch()
    # Frozen head (LoRA): no head gradient, the others unchanged.
    model = tiny_model(seed=10, z_loss_weight=1e-3)
    _, expected = loss_and_grads(model, lambda m: reference_loss(m, ids, labels, 1e-3))
    model.lm_head.weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(ids, labels=labels).loss.backward()
    assert model.lm_head.weight.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # bf16 weights: gradients in bf16, close to the full-logits reference of the same model.
    model = tiny_model(seed=10).to(torch.bfloat16)
    loss, grads = loss_and_grads(model, lambda m: m(ids, labels=labels).loss)
    expected_loss, expected = loss_and_grads(model, lambda m: reference_loss(m, ids, labels))
    assert loss.dtype == torch.float32 and abs(loss.item() - expected_loss.item()) <= 1e-3
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16
        error = (grad.float() - expected[name].float()).norm() / expected[name].float().norm()
        assert error <= 0.02, (name, error.item())


def test_chunked_loss_large_vocabulary():
    # More head rows than the backward handles at once (4096), and several chunks.
    model = tiny_model(seed=11, vocab_size=9000, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    ids = random_ids(2, 10, seed=13) * 9
    labels = ids.clone()
    labels[:, :3] = -100
    loss, grads = loss_and_grads(model, lambda m: m(ids, labels=labels).loss)

    def reference(m):
        logits = m(ids, use_cache=False).logits[:, :-1].reshape(-1, 9000)
        return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    expected_loss, expected = loss_and_grads(model, reference)
    assert abs(loss.item() - expected_loss.item()) <= 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_without_labelled_positions_is_zero_and_differentiable():
    model = tiny_model()
    ids = random_ids(2, 6)
    labels = torch.full_like(ids, -100)
    labels[0, 0] = ids[0, 0]  # the first token is never a target
    loss = model(ids, labels=labels).loss
    assert loss.item() == 0.0
    loss.backward()


# --------------------------------------------------------------------------------------------
# 6. config and checkpoint format


OFFICIAL_7B_CONFIG = {
    "_from_model_config": True,
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_max_length": 4096,
    "model_type": "baichuan",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.29.2",
    "use_cache": True,
    "vocab_size": 125696,
    "z_loss_weight": 0,
}


def test_official_7b_config_loads_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_7B_CONFIG), encoding="utf-8")
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is BaichuanConfig
    skip = {"_from_model_config", "auto_map", "torch_dtype", "transformers_version"}
    for key, value in OFFICIAL_7B_CONFIG.items():
        if key not in skip:
            assert getattr(config, key) == value, key
    assert config.dtype == torch.bfloat16
    assert config.position_embedding == "rope"
    assert config.head_dim == 128 and config.num_key_value_heads == 32

    thirteen = dict(OFFICIAL_7B_CONFIG, hidden_size=5120, intermediate_size=13696)
    thirteen.update(num_hidden_layers=40, num_attention_heads=40)
    (tmp_path / "config.json").write_text(json.dumps(thirteen), encoding="utf-8")
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.position_embedding == "alibi" and config.head_dim == 128
    assert BaichuanConfig().position_embedding == "rope"
    # Once saved, the field is explicit and survives a reload.
    config.save_pretrained(tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved").position_embedding == "alibi"
    with pytest.raises(ValueError):
        BaichuanConfig(position_embedding="learned")


def test_state_dict_keys_are_the_official_names():
    expected = ["model.embed_tokens.weight"]
    for i in range(2):
        expected += [
            f"model.layers.{i}.self_attn.W_pack.weight",
            f"model.layers.{i}.self_attn.o_proj.weight",
            f"model.layers.{i}.mlp.gate_proj.weight",
            f"model.layers.{i}.mlp.up_proj.weight",
            f"model.layers.{i}.mlp.down_proj.weight",
            f"model.layers.{i}.input_layernorm.weight",
            f"model.layers.{i}.post_attention_layernorm.weight",
        ]
    expected += ["model.norm.weight", "lm_head.weight"]
    state = tiny_model().state_dict()
    assert sorted(state) == sorted(expected)
    assert state["model.layers.0.self_attn.W_pack.weight"].shape == (3 * 64, 64)
    assert state["lm_head.weight"].shape == (VOCAB, 64)


def test_official_bin_checkpoint_loads(tmp_path):
    model = tiny_model(seed=6)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, info = BaichuanForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


# --------------------------------------------------------------------------------------------
# 7. Auto classes, in process and with trust_remote_code in a process without the package


def test_auto_model_roundtrip(tmp_path):
    model = tiny_model(seed=7, position_embedding="alibi")
    model.save_pretrained(tmp_path)
    for name in ("configuration_baichuan.py", "modeling_baichuan.py"):
        assert (tmp_path / name).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BaichuanForCausalLM and loaded.config.position_embedding == "alibi"
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = tokenizer(sys.argv[2], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"ids": ids, "logits": logits}, sys.argv[3])
    print(json.dumps({
        "model": type(model).__module__ + "." + type(model).__name__,
        "tokenizer": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
        "baichuan_imported": "baichuan" in sys.modules,
    }))
    """
)


def test_trust_remote_code_without_the_package(tiny_model_dir, tmp_path):
    text = "孙悟空，你的金箍棒是从哪里得来的？ Hello 123"
    result_path = tmp_path / "result.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tiny_model_dir), text, str(result_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not info["baichuan_imported"]
    assert info["model"].startswith("transformers_modules.") and info["model"].endswith(".BaichuanForCausalLM")
    assert info["tokenizer"].endswith(".BaichuanTokenizer") and not info["tokenizer"].startswith("baichuan.")
    result = torch.load(result_path)

    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == result["ids"].tolist()
    with torch.no_grad():
        logits = model(ids).logits
    assert max_diff(logits, result["logits"]) <= 1e-6


# --------------------------------------------------------------------------------------------
# 8. gradient checkpointing: same loss and gradients, and the layers do run twice


def count_layer_calls(model) -> list[int]:
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize(
    "enable, kwargs, expected_calls",
    [
        ("gradient_checkpointing_enable", {}, [2, 2]),  # every layer recomputed in backward
        ("activation_checkpointing_enable", {}, [2, 2]),
        ("activation_checkpointing_enable", {"every_n_layers": 2}, [2, 1, 2]),  # what the Trainer passes on
    ],
)
def test_gradient_checkpointing_same_loss_and_grads(enable, kwargs, expected_calls):
    if not hasattr(BaichuanForCausalLM, enable):
        pytest.skip(f"this transformers has no {enable}")
    ids, labels = labelled_batch()
    plain = tiny_model(seed=8, num_hidden_layers=len(expected_calls)).train()
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated
        getattr(checkpointed, enable)(**kwargs)
    plain_calls, checkpointed_calls = count_layer_calls(plain), count_layer_calls(checkpointed)
    expected_loss, expected_grads = loss_and_grads(plain, lambda m: m(ids, labels=labels).loss)
    loss, grads = loss_and_grads(checkpointed, lambda m: m(ids, labels=labels).loss)
    assert plain_calls == [1] * len(expected_calls)
    assert checkpointed_calls == expected_calls
    assert abs(loss.item() - expected_loss.item()) <= 1e-6
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Without gradients (evaluation, generation) nothing is checkpointed and the cache works.
    with torch.no_grad():
        assert greedy(checkpointed.eval(), ids[:1], new_tokens=3).shape == (1, 3)


# --------------------------------------------------------------------------------------------
# NormHead: cached row norms without autograd


def test_norm_head_cache_follows_weight_and_mode():
    model = tiny_model(seed=9)
    ids = random_ids(1, 6)
    with torch.no_grad():
        before = model(ids).logits
        model.lm_head.weight[:10].mul_(3.0)  # scaling rows changes nothing: they are normalised
        assert max_diff(model(ids).logits, before) <= 1e-5
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
        after = model(ids).logits
        fresh = copy.deepcopy(model)
        fresh.lm_head._inv_norm = fresh.lm_head._inv_norm_key = None
        assert max_diff(after, fresh(ids).logits) <= 1e-6 and max_diff(after, before) > 1e-2
    # A frozen head (LoRA) evaluated under inference_mode, then trained: no inference tensor
    # may leak into autograd.
    model = tiny_model(seed=9)
    model.lm_head.weight.requires_grad_(False)
    with torch.inference_mode():
        model(ids)
    model(ids).logits.sum().backward()
    model(ids, labels=ids).loss.backward()

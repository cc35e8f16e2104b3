"""Baichuan2-7B as a plain Llama checkpoint, for tools that know Llama but not Baichuan.

Baichuan2-7B is Llama-2 with two differences in how the weights are stored:
  - `W_pack` fuses the q, k and v projections (rows [q; k; v], hidden_size each);
  - `lm_head` is a NormHead, which L2-normalises its weight rows before every use.
Splitting the one and normalising the other once gives a `LlamaForCausalLM` with the same
logits. Baichuan2-13B puts ALiBi biases where Llama rotates, so it has no Llama form.

    from baichuan.convert_llama import save_as_llama
    save_as_llama(merged_model, tokenizer, "out/llama")   # config, safetensors, tokenizer, generation config

The directory loads with `AutoModelForCausalLM` / `AutoTokenizer` alone: no remote code, and
none of this package.
"""

import copy
import json
import os

import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import AddedToken, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .configuration_baichuan import position_embedding_of
from .generation_utils import chat_template
from .modeling_baichuan import row_inv_norm

# Rows of the head normalised at once: bounds the fp32 temporary to 32 MiB at width 4096.
HEAD_BLOCK_ROWS = 2048


def check_convertible(config) -> None:
    """Raise a one-line ValueError when the model has no Llama form."""
    if position_embedding_of(config) == "alibi":
        raise ValueError(
            "this model uses ALiBi position biases (Baichuan2-13B), which Llama cannot express: "
            "only the rotary Baichuan2-7B converts to Llama; keep --format baichuan"
        )


@torch.no_grad()
def normalized_head(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` (vocab, hidden) with L2-unit rows, computed in fp32, in weight's dtype."""
    inv_norm = row_inv_norm(weight)  # (vocab,)
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], HEAD_BLOCK_ROWS):
        rows = slice(start, start + HEAD_BLOCK_ROWS)
        out[rows] = (weight[rows].float() * inv_norm[rows, None]).to(weight.dtype)
    return out


@torch.no_grad()
def normalize_head_(model) -> None:
    """Store NormHead's weight normalised, in place. NormHead normalises again at use, which
    leaves unit rows unchanged, so the logits stay the same; readers of the checkpoint that
    skip the normalisation (other converters) then get them right too."""
    model.lm_head.weight.copy_(normalized_head(model.lm_head.weight))


def llama_config(config, dtype: torch.dtype, attn_implementation: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        attn_implementation=attn_implementation,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        # the official 7B code has no such field and rotates with base 10000
        rope_parameters={"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)},
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        dtype=dtype,
    )


@torch.no_grad()
def llama_state_dict(model) -> dict[str, torch.Tensor]:
    """Llama parameter names -> tensors. q/k/v are copies: safetensors refuses tensors that share
    storage, and slices of W_pack would. Everything else is the model's own tensor."""
    hidden = model.config.hidden_size
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("self_attn.W_pack.weight"):
            prefix = name[: -len("W_pack.weight")]
            query, key, value = tensor.split(hidden, dim=0)  # each (hidden, hidden)
            state[prefix + "q_proj.weight"] = query.clone()
            state[prefix + "k_proj.weight"] = key.clone()
            state[prefix + "v_proj.weight"] = value.clone()
        elif name == "lm_head.weight":
            state[name] = normalized_head(tensor)
        else:
            state[name] = tensor
    return state


def llama_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """A tokenizers-backed copy of the Baichuan2 sentencepiece tokenizer with the same ids.

    Why a tokenizer.json of our own: from tokenizer.model alone, transformers 5.24's
    `LlamaTokenizer` builds its BPE merges in piece-id order, while sentencepiece merges by piece
    score. Baichuan2 appended pieces (ids >= 99968) whose scores rank them far earlier than
    their ids, so it splits e.g. " 一读" differently (24 of RoleBench's 45,487 texts).
    `SpmConverter.build_tokenizer_from_spm_proto` follows the sentencepiece model's own
    settings: score-ranked merges, no dummy prefix, identity normalisation, byte fallback,
    user-defined pieces kept whole.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp_model.serialized_model_proto())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=False,
    )
    # The user-defined pieces (the chat tokens, "...", "<br>", ...) as added tokens at their own
    # ids: the backend already keeps them whole, but llama.cpp's converter learns that they are
    # to be matched whole only from the added tokens in tokenizer_config.json.
    user_defined = [piece.piece for piece in proto.pieces if piece.type == piece.USER_DEFINED]
    fast.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in user_defined])
    return fast


def save_llama_tokenizer(tokenizer, generation_config, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the Baichuan2 chat template) and a copy of
    tokenizer.model (llama.cpp's converter reads the sentencepiece model)."""
    fast = llama_tokenizer(tokenizer)
    fast.chat_template = chat_template(tokenizer, generation_config)
    fast.model_max_length = model_max_length
    # The template inside tokenizer_config.json, where transformers 4.x and vLLM read it too.
    fast.save_pretrained(out_dir, save_jinja_files=False)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    # 5.24 writes its own class name, which transformers 4.x does not know; both (4.57 and 5.24
    # tried) read PreTrainedTokenizerFast from tokenizer.json as it is. 5.24 keeps the added tokens in
    # tokenizer.json only, llama.cpp's converter looks for them here. add_prefix_space: read by
    # that converter too (its sentencepiece tokenizer prepends a space unless told not to); the
    # tokenizers backend has no dummy prefix either way.
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        added_tokens_decoder={str(i): token.__getstate__() for i, token in fast.added_tokens_decoder.items()},
    )
    tmp = config_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    os.replace(tmp, config_path)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tokenizer.sp_model.serialized_model_proto())


def to_llama(model, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """The `LlamaForCausalLM` with the same function as `model` (a rotary BaichuanForCausalLM), in its
    dtype and on its device. It holds copies of q/k/v and of the normalised head; the other
    tensors are shared with `model`."""
    check_convertible(model.config)
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config(model.config, model.lm_head.weight.dtype, attn_implementation))
    llama.load_state_dict(llama_state_dict(model), strict=True, assign=True)
    # the rotary frequencies are a buffer outside the state dict, still on the meta device
    with model.lm_head.weight.device:
        llama.model.rotary_emb = LlamaRotaryEmbedding(llama.config)
    llama.generation_config = copy.deepcopy(model.generation_config)
    return llama.eval()


def save_as_llama(model, tokenizer, out_dir: str, max_shard_size: str = "2GB") -> None:
    """Write `model` (a BaichuanForCausalLM with rotary positions) as a Llama checkpoint into
    `out_dir`, which may exist: files already there that are not written here are kept.

    Weights are stored in the model's dtype. Until they are saved, copies of q/k/v and of the
    normalised head are held besides the model (about 4 GiB for Baichuan2-7B in bf16).
    """
    llama = to_llama(model)
    config = llama.config
    llama.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    max_length = getattr(model.config, "model_max_length", None) or config.max_position_embeddings
    save_llama_tokenizer(tokenizer, model.generation_config, out_dir, max_length)

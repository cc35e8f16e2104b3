"""Baichuan2 causal language model for transformers 5.x.

Baichuan2-7B uses rotary positions, Baichuan2-13B uses ALiBi; `config.position_embedding`
selects between them. Parameter names equal the official checkpoints', so their `.bin` and
safetensors shards load with no missing or unexpected keys.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_baichuan import BaichuanConfig

# Logit elements computed at once by the chunked loss: at most 128 MiB of fp32 per chunk.
LOSS_CHUNK_ELEMENTS = 2**25


class BaichuanRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of shape (b, q, d). Computed on the fly: a buffer would be left as garbage or
    on the meta device by `from_pretrained`, and the cost is tiny next to the projections."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (d/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (b, q, d/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (b, q, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(query, key, cos, sin):
    cos, sin = cos[:, None], sin[:, None]  # (b, 1, q, d), broadcast over heads
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes as Baichuan2-13B defines them: a geometric series for a power of
    two heads; otherwise the nearest lower power of two, topped up with every other slope of
    the next power of two."""
    if math.log2(num_heads).is_integer():
        start = 2 ** (-(2 ** -(math.log2(num_heads) - 3)))
        return [start ** (i + 1) for i in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def attention_bias(segments: torch.Tensor, q_len: int, slopes: torch.Tensor | None, dtype: torch.dtype, positions=None):
    """Additive attention bias of shape (b, 1 or heads, q, kv).

    `segments` is (b, kv): 0 marks padding, and equal positive values mark one sequence, so a
    plain 0/1 attention mask works, and so do packed rows numbered 1, 2, 3, ... A query sees
    the earlier keys of its own sequence, and the keys marked -1: a prompt shared by all the
    sequences packed after it. With ALiBi, the distance comes from `positions` (b, kv) when
    given, else it counts real tokens only, so that left padding does not shift it.
    """
    kv_len = segments.shape[1]
    key_idx = torch.arange(kv_len, device=segments.device)
    query_idx = key_idx[kv_len - q_len :]
    seg_k = segments[:, None, :]  # (b, 1, kv)
    seg_q = segments[:, kv_len - q_len :, None]  # (b, q, 1)
    causal = key_idx[None, None, :] <= query_idx[None, :, None]  # (1, q, kv)
    # A padding query would see no key at all and softmax would return NaN: let it see itself.
    diagonal = key_idx[None, None, :] == query_idx[None, :, None]
    allowed = (((seg_k == seg_q) | (seg_k == -1)) & (seg_k != 0) & causal) | diagonal  # (b, q, kv)
    if slopes is None:
        bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)[:, None]  # (b, 1, q, kv)
    else:
        position = positions if positions is not None else (segments != 0).cumsum(-1)  # (b, kv)
        distance = position[:, None, :] - position[:, kv_len - q_len :, None]  # (b, q, kv), <= 0 when visible
        bias = (slopes.to(segments.device)[None, :, None, None] * distance[:, None]).to(dtype)  # (b, heads, q, kv)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class BaichuanMLP(nn.Module):
    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # One fused projection: rows are [q; k; v], each hidden_size wide.
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, bias, cos, sin, cache: Cache | None):
        b, q_len, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states).view(b, q_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, q, d)
        if cos is not None:
            query, key = apply_rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (b, heads, kv, d)
        if bias is not None and bias.dtype != query.dtype:
            bias = bias.to(query.dtype)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, is_causal=bias is None and q_len > 1
        )  # (b, heads, q, d)
        out = out.transpose(1, 2).reshape(b, q_len, -1)  # (b, q, hidden)
        return self.o_proj(out)


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, bias, cos, sin, cache: Cache | None = None):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), bias, cos, sin, cache)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


def row_inv_norm(weight: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """1 / L2 norm of each row, in fp32, a block of rows at a time: a whole fp32 copy of
    Baichuan2-7B's bf16 head would be a 1.9 GiB temporary."""
    norms = [torch.linalg.vector_norm(weight[i : i + block].float(), dim=-1) for i in range(0, weight.shape[0], block)]
    return torch.cat(norms).clamp_min(1e-12).reciprocal()  # (vocab,)


class NormHead(nn.Module):
    """Output head whose weight rows are L2-normalised before use.

    The scale is applied to the logits rather than to a normalised copy of the weight, which
    would take another vocab x hidden tensor. Without autograd the row norms are kept until
    the weight changes, so decoding does not re-read the whole head for them at every token.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self._inv_norm = None
        self._inv_norm_key = None

    def inv_norm(self) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return row_inv_norm(w)
        # Norms cached under inference_mode are inference tensors, which autograd refuses to save
        # (a frozen head in LoRA training after an evaluation): cache per mode.
        key = (w.data_ptr(), w._version, w.device, w.dtype, torch.is_inference_mode_enabled())
        if key != self._inv_norm_key:
            self._inv_norm = row_inv_norm(w)
            self._inv_norm_key = key
        return self._inv_norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)  # (b, q, vocab)
        inv_norm = self.inv_norm().to(logits.dtype)
        if logits.requires_grad:
            return logits * inv_norm
        return logits.mul_(inv_norm)  # decoding: no second vocab-sized buffer per token


def _chunk_logits(hidden, weight, inv_norm):
    """fp32 logits of one chunk of positions under the normalised head: (n, vocab)."""
    return F.linear(hidden, weight).float().mul_(inv_norm)


def _softmax_(logits):
    """Turn logits (n, vocab) into their softmax in place; returns log-sum-exp (n, 1)."""
    peak = logits.amax(dim=-1, keepdim=True)
    total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    logits.div_(total)
    return peak + total.log()


class NormHeadLoss(torch.autograd.Function):
    """Summed cross-entropy (plus z-loss) of `hidden` (n, hidden) against `targets` (n,) under the
    L2-normalised head, `chunk` positions at a time, in fp32.

    Nothing of size n x vocab is kept: when gradients are wanted they are computed in the same
    pass, while each chunk's softmax is at hand, and backward only scales them by the incoming
    gradient (the loss is the end of the graph, so that gradient is a scalar and the chunk's
    gradient is linear in it). One chunk of logits is alive at a time, and each chunk costs two
    vocab-sized matmuls instead of the three a recomputing backward needs. With
    g = dloss/dlogits, logits = (hidden @ weight.T) * inv_norm and D = (g * inv_norm).T @ hidden:
        dhidden = (g * inv_norm) @ weight,
        dweight = D - rowdot(weight, D) * inv_norm**2 * weight,
    the second term coming from the row norms.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_norm, chunk: int, z_loss_weight: float, with_grad: bool):
        # needs_input_grad says what requires grad even under no_grad, hence `with_grad` from the caller
        need_hidden, need_weight = (with_grad and need for need in ctx.needs_input_grad[:2])
        if inv_norm is None:
            inv_norm = row_inv_norm(weight)  # (vocab,)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (n, hidden)
        grad_weight = torch.zeros_like(weight) if need_weight else None  # (vocab, hidden): D, then dweight
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = _chunk_logits(h, weight, inv_norm)  # (c, vocab)
            target_logits = logits.gather(-1, t[:, None])  # (c, 1)
            lse = _softmax_(logits)  # logits hold the softmax now
            total += (lse - target_logits).sum()
            if z_loss_weight > 0:
                total += z_loss_weight * lse.pow(2).sum()
            if not (need_hidden or need_weight):
                continue
            grad = logits
            if z_loss_weight > 0:
                grad.mul_(1 + 2 * z_loss_weight * lse)  # d(w lse^2) = 2 w lse softmax
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1
            grad = grad.mul_(inv_norm).to(weight.dtype)  # g * inv_norm (c, vocab)
            if need_hidden:
                grad_hidden[start : start + chunk] = grad @ weight
            if need_weight:
                grad_weight.addmm_(grad.T, h)
            del grad, logits
        if need_weight:
            # rowdot(weight, D) in fp32, a block of rows at a time to keep the temporaries small.
            coef = torch.empty_like(inv_norm)  # (vocab,)
            for start in range(0, weight.shape[0], 4096):
                rows = slice(start, start + 4096)
                coef[rows] = (weight[rows].float() * grad_weight[rows].float()).sum(-1)
            grad_weight.addcmul_(weight, (coef * inv_norm.pow(2)).to(weight.dtype)[:, None], value=-1)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total
        if grad_weight is not None:
            grad_weight = grad_weight * grad_total
        return grad_hidden, grad_weight, None, None, None, None, None


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NormHead):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        # The base class applies `every_n_layers` to GradientCheckpointingLayer subclasses only;
        # our layers are checkpointed by BaichuanModel, which is told the stride here.
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for module in self.modules():
            if isinstance(module, BaichuanModel):
                module.checkpoint_every_n_layers = every_n_layers


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.checkpoint_every_n_layers = 1
        self.post_init()

    def _bias(self, attention_mask, position_ids, batch, q_len, kv_len, dtype, device):
        slopes = None
        if self.config.position_embedding == "alibi":
            slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), device=device)
        unmasked = attention_mask is None or bool((attention_mask == 1).all())
        if unmasked and slopes is None and (q_len == 1 or q_len == kv_len):
            return None  # plain causal attention: SDPA's is_causal takes its fastest kernel
        if attention_mask is None:
            attention_mask = torch.ones(batch, kv_len, dtype=torch.long, device=device)
        positions = None
        if position_ids is not None and position_ids.shape[-1] == kv_len:
            positions = position_ids.expand(batch, -1)  # (b, kv)
        return attention_bias(attention_mask, q_len, slopes, dtype, positions)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, q, hidden)
        batch, q_len, _ = hidden_states.shape

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if checkpointing or not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0  # read before the layers update it
        kv_len = past_len + q_len

        if position_ids is None:
            if attention_mask is not None:
                # Count real tokens only, so a left-padded row gets the positions it has unpadded.
                position_ids = ((attention_mask != 0).long().cumsum(-1) - 1).clamp_min(0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, kv_len, device=hidden_states.device)[None]
        bias = self._bias(attention_mask, position_ids, batch, q_len, kv_len, hidden_states.dtype, hidden_states.device)
        cos = sin = None
        if self.config.position_embedding == "rope":
            cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, hidden_states.dtype)

        for i, layer in enumerate(self.layers):
            if checkpointing and i % self.checkpoint_every_n_layers == 0:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states, bias, cos, sin)
            else:
                hidden_states = layer(hidden_states, bias, cos, sin, cache)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    # Tells the HF Trainer that forward takes `num_items_in_batch`, so that with gradient
    # accumulation the loss is weighted by tokens rather than averaged over micro-batches.
    accepts_loss_kwargs = True

    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast:
        """With `labels`, only the loss is returned (logits=None): it is computed at the labelled
        positions alone, in chunks, and the full (b, s, vocab) logits are never built.

        transformers >= 5.24 passes the KV cache as `cache`, earlier 5.x as `past_key_values`;
        both are accepted so that neither is silently dropped. `num_items_in_batch` (the HF
        Trainer's count of labelled tokens over the accumulation steps) replaces the per-batch
        count as the loss denominator. The output is always a dataclass; attention weights and
        hidden states are not returned (SDPA never materialises the former).
        """
        if output_attentions or output_hidden_states:
            raise NotImplementedError("BaichuanForCausalLM returns neither attentions nor hidden states")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state  # (b, s, hidden)
        if labels is not None:
            loss = self.loss(hidden_states, labels, num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden_states), cache=outputs.cache)

    def loss(self, hidden_states, labels, num_items_in_batch=None) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose label is not -100."""
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (b, s): position t predicts token t+1
        keep = shift_labels != -100
        hidden = hidden_states[keep]  # (n, hidden)
        targets = shift_labels[keep]  # (n,)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // self.config.vocab_size)
        pieces = max(1, math.ceil(targets.numel() / chunk))
        chunk = max(1, math.ceil(targets.numel() / pieces))  # equal chunks: 300 positions as 150 + 150, not 266 + 34
        weight = self.lm_head.weight
        inv_norm = None if weight.requires_grad else self.lm_head.inv_norm()  # a frozen head's norms are cached
        total = NormHeadLoss.apply(hidden, weight, targets, inv_norm, chunk, self.config.z_loss_weight,
                                   torch.is_grad_enabled())
        count = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
        return total / count

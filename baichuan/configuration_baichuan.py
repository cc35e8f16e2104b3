"""Configuration of the Baichuan2 model family (7B with rotary positions, 13B with ALiBi)."""

from transformers import PreTrainedConfig


def position_embedding_of(config) -> str:
    """"rope" or "alibi": the config's own field, else what the official releases imply, which split
    7B and 13B into different modeling files: a 5120-wide model is the 13B (ALiBi). Any config
    with a hidden_size will do, an official one read by its own remote code included."""
    position = getattr(config, "position_embedding", None)
    if position is not None:
        return position
    return "alibi" if config.hidden_size == 5120 else "rope"


class BaichuanConfig(PreTrainedConfig):
    """Defaults are Baichuan2-7B's. The official `config.json` files load unchanged.

    `position_embedding` is "rope" (7B) or "alibi" (13B). The official configs do not carry
    this field: the 7B and 13B releases ship different modeling files instead. When it is
    absent, it is derived from the shape the way the official files are split: a 5120-wide
    model is the 13B (ALiBi), anything else uses rotary positions.
    """

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 125696
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    model_max_length: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    z_loss_weight: float = 0.0
    rope_theta: float = 10000.0
    position_embedding: str | None = None

    def __post_init__(self, **kwargs):
        self.position_embedding = position_embedding_of(self)
        if self.position_embedding not in ("rope", "alibi"):
            raise ValueError(f"position_embedding must be 'rope' or 'alibi', got {self.position_embedding!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        # Baichuan2 has no grouped-query attention; DynamicCache and PEFT read this name.
        return self.num_attention_heads

"""Parameter counts, and the per-GPU memory estimate of `train.py --dry_run`."""

import torch

from utils.training.distributed import print_rank_0


def parameter_counts(model, assume_4bit: bool = False) -> tuple[int, int, int]:
    """(trainable, stored total, full total) parameter counts.

    A 4-bit weight is stored packed two to a byte, so its tensor has half as many elements.
    The stored total counts those elements, which is what PEFT printed when the book was
    written (35,782,656 trainable = 0.8314% for Baichuan2-7B with LoRA rank 16); the full total
    counts every weight once, as PEFT does now. `assume_4bit` treats the frozen weights of
    linear layers (lm_head excepted) as 4-bit, for a skeleton built on the meta device.
    """
    trainable = stored = full = 0
    packed = set()
    if assume_4bit:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                packed.add(id(module.weight))
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            stored += n
            full += n * 2 * param.element_size()
        elif id(param) in packed and not param.requires_grad:
            stored += n // 2
            full += n
        else:
            stored += n
            full += n
        if param.requires_grad:
            trainable += n
    return trainable, stored, full


def print_trainable_parameters(model, assume_4bit: bool = False) -> None:
    trainable, stored, full = parameter_counts(model, assume_4bit)
    print_rank_0(
        f"trainable params: {trainable:,} || all params: {stored:,} || trainable%: {100 * trainable / stored:.4f}"
        f"  (counting each 4-bit weight once: {full:,} params, {100 * trainable / full:.4f}%)"
    )


def nf4_bits_per_weight() -> float:
    """Bits a weight takes in bitsandbytes' NF4 with double quantisation, scales included, measured
    by quantising a small tensor the way the 4-bit base is quantised (about 4.127)."""
    import bitsandbytes as bnb

    weight = torch.randn(256, 1024)
    packed, state = bnb.functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    stored = [packed, state.absmax, state.state2.absmax]
    return 8 * sum(t.numel() * t.element_size() for t in stored) / weight.numel()


def memory_estimate(model, config, train, ds_config: dict) -> dict[str, float]:
    """Bytes per GPU, by part, of training `model` (a LoRA skeleton on the meta device, of the
    transformers `config`) as `train` (a TrainConfig) says."""
    from baichuan.modeling_baichuan import LOSS_CHUNK_ELEMENTS

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head") and not m.weight.requires_grad)
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad) - linear
    bits = nf4_bits_per_weight() if train.model.quantization_bit == 4 else 16
    b, s = train.optim.per_device_train_batch_size, train.data.max_len
    h, i = config.hidden_size, config.intermediate_size
    layer_acts = b * s * (10 * h + 4 * i) * 2  # bf16 inputs kept for backward in one layer
    if train.model.gradient_checkpointing:
        acts = config.num_hidden_layers * b * s * h * 2 + layer_acts
    else:
        acts = config.num_hidden_layers * layer_acts
    zero = ds_config.get("zero_optimization", {})
    return {
        "weights": linear * bits / 8 + other * 2,
        "LoRA + optimizer": trainable * (2 + 2 + 4 + 8),  # bf16 weight and grad, fp32 master, Adam moments
        "activations": acts,
        # the chunked loss: a chunk of fp32 logits (turned into its softmax in place) and its bf16 gradient
        "loss": LOSS_CHUNK_ELEMENTS * (4 + 2),
        # ZeRO-2's gradient buckets, in bf16 (sizes in elements; DeepSpeed's defaults are 5e8)
        "DeepSpeed buckets": 2 * (zero.get("reduce_bucket_size", 5e8) + zero.get("allgather_bucket_size", 5e8)),
    }

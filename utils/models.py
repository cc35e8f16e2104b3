"""Loading models and tokenizers: device and dtype, a base for QLoRA training, a model to chat with.

Every base model (training, merging, chatting, the benches) loads through `load_base_model`, which
prints its load time as one line instead of transformers' per-weight progress bar.
Every loader reports what cannot be loaded (a missing directory, a hub id that cannot be fetched,
a corrupt adapter, an adapter made for another base) as a one-line UserError.
"""

import os
import sys
import time

import torch
from safetensors import SafetensorError

from utils.cli import UserError

# What loading a model, an adapter or a checkpoint's tensors raises on a missing, corrupt or
# mismatched file: safetensors' SafetensorError derives from Exception alone, and a broken JSON
# file's JSONDecodeError is a ValueError.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def pick_device_dtype(device: str | int | None = None) -> tuple[torch.device, torch.dtype]:
    """The one place where device and dtype are decided.

    `device` is None/"auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:N", or an int
    (-1 = CPU, N = cuda:N, as merge_params.py's `--device`). GPUs get bf16 where supported,
    else fp16; the CPU gets fp32, since half-precision matmuls there are slow or missing.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif isinstance(device, int) or (isinstance(device, str) and device.lstrip("-").isdigit()):
        device = "cpu" if int(device) < 0 else f"cuda:{int(device)}"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for, but CUDA is not available")
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        raise UserError(f"unsupported device {device}: use auto, cpu, cuda or cuda:N")
    return device, torch.float32


def check_model_dir(path: str, what: str = "model") -> None:
    """A local path must hold a config.json; anything else is taken as a hub id."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{what} directory {path!r} has no config.json")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def cannot_load(path: str, error: BaseException, adapter: str | None = None) -> UserError:
    """One line for a model that cannot be loaded; a hub id that cannot be fetched says what to do."""
    where = f"{path!r}" + (f" with adapter {adapter!r}" if adapter else "")
    if not os.path.exists(path):
        return UserError(f"cannot fetch {where} from the Hugging Face hub ({first_line(error)}): download it "
                         f"where there is a network (`hf download {path} --local-dir DIR`) and pass DIR instead")
    return UserError(f"cannot load the model from {where}: {first_line(error)}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    import baichuan  # noqa: F401  (registers the Auto classes)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as error:
        raise cannot_load(path, error) from None


def load_tokenizer_for(model_path: str, adapter_path: str | None, trust_remote_code: bool = False):
    """The tokenizer of an adapter directory when it carries one (checkpoints do), else the model's."""
    has_own = adapter_path is not None and os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json"))
    return load_tokenizer(adapter_path if has_own else model_path, trust_remote_code)


def quantization_config(bits: int | None, compute_dtype: torch.dtype):
    """bitsandbytes settings for `bits` (4: NF4 with double quantisation, as QLoRA; 8: LLM.int8());
    None (or 16) loads the weights unquantised."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def keep_4bit_layout(model, where=lambda module: True) -> None:
    """Keep bitsandbytes' 4-bit layers (those `where` picks) in the layout they were loaded in.

    After the first no-grad eval-mode forward on the CPU, bitsandbytes 0.50 repacks a 4-bit weight
    for its fast CPU kernel: that breaks LoRA gradients through it, and fails (instead of falling
    back) unless the layer's output size is a multiple of 32 and its input size one of the
    quantisation block size (every Baichuan2 layer is; a tiny test model's are not).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and where(module):
            module.support_avx512bf16_for_cpu = False


def quiet_weight_loading() -> None:
    """Turn off transformers' "Loading weights" progress bar, a few seconds of nothing to act on.
    transformers' switch also turns off huggingface_hub's download bars, which are worth watching
    on a first download of a 15 GB model, so those are turned back on unless they were off."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    downloads_were_off = hub.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if not downloads_were_off:
        hub.enable_progress_bars()


def load_base_model(path: str, device: torch.device, dtype: torch.dtype, quantization_bit: int | None = None,
                    trust_remote_code: bool = False, log=print):
    """The one loader of a base model: placed on `device` as it loads, in `dtype`, its linear
    layers (lm_head excepted) quantised with `quantization_bit` 4 or 8. `log` (unless None) gets
    the one line that says how long it took."""
    import baichuan  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    quiet_weight_loading()
    quantization = quantization_config(quantization_bit, dtype)
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                     device_map={"": device}, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as error:
        raise cannot_load(path, error) from None
    if log is not None:
        log(load_line(path, quantization_bit, dtype, device, started))
    return model


def load_line(path: str, quantization_bit: int | None, dtype: torch.dtype, device: torch.device,
              started: float) -> str:
    bits = f"{quantization_bit}-bit" if quantization_bit in (4, 8) else str(dtype).removeprefix("torch.")
    return f"loaded {path} ({bits}, {device}) in {time.perf_counter() - started:.1f} s"


def load_for_inference(
    model_path: str,
    adapter_path: str | None = None,
    device: str | int | None = None,
    trust_remote_code: bool = False,
    quantization_bit: int | None = None,
):
    """Model and tokenizer ready to generate: a merged directory, or a base plus a LoRA adapter;
    with `quantization_bit` 4 or 8, the base's linear layers (lm_head excepted) are quantised as
    they load, and an adapter stays unmerged on top of them."""
    check_model_dir(model_path)
    if adapter_path is not None and not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise UserError(f"adapter directory {adapter_path!r} has no adapter_config.json")
    device, dtype = pick_device_dtype(device)
    tokenizer = load_tokenizer_for(model_path, adapter_path, trust_remote_code)
    started = time.perf_counter()
    model = load_base_model(model_path, device, dtype, quantization_bit, trust_remote_code, log=None)
    if adapter_path is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_path)
        except LOAD_ERRORS as error:
            raise cannot_load(model_path, error, adapter_path) from None
    if quantization_bit in (4, 8) and device.type == "cpu":
        keep_4bit_layout(model, lambda module: module.out_features % 32 != 0
                         or module.in_features % module.weight.quant_state.blocksize != 0)
    # once the adapter is in too (a bad one is then the only line), on stderr: the front ends'
    # standard output is the chat itself
    where = model_path + (f" with adapter {adapter_path}" if adapter_path else "")
    print(load_line(where, quantization_bit, dtype, device, started), file=sys.stderr, flush=True)
    return model.eval(), tokenizer


def prepare_for_adapter(model, gradient_checkpointing: bool):
    """A loaded base made ready for an adapter to be trained on it: without the KV cache, with
    gradient checkpointing if asked."""
    keep_4bit_layout(model)  # an evaluation forward would break the LoRA gradients
    model.config.use_cache = False
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model, gradient_checkpointing: bool, lora):
    """A loaded base made ready for LoRA training (prepare_for_adapter), frozen, with LoRA (a
    LoraConfig of utils.training.config) on every linear layer but lm_head (PEFT's "all-linear")."""
    import peft

    prepare_for_adapter(model, gradient_checkpointing)
    # PEFT freezes the base; prepare_model_for_kbit_training is not used because it would copy the
    # embeddings and the head to fp32 (2 GB each for Baichuan2-7B)
    return peft.get_peft_model(model, peft.LoraConfig(r=lora.lora_dim, lora_alpha=lora.lora_alpha,
                                                      lora_dropout=lora.lora_dropout, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))


def load_for_training(model_config, lora, device: torch.device, dtype: torch.dtype, log=print):
    """The base model of `model_config` (a ModelConfig: 4-bit NF4 with double quantisation unless
    quantization_bit is 16), frozen, with LoRA as `lora` says (add_lora)."""
    model = load_base_model(model_config.model_name_or_path, device, dtype, model_config.quantization_bit,
                            model_config.trust_remote_code, log)
    return add_lora(model, model_config.gradient_checkpointing, lora)

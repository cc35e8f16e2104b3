"""Loading models and tokenizers: device and dtype, a base for QLoRA training, a model to chat with.

Every loader reports what cannot be loaded (a missing directory, a hub id that cannot be fetched,
a corrupt adapter, an adapter made for another base) as a one-line UserError.
"""

import os

import torch
from safetensors import SafetensorError

from utils import UserError

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
    import baichuan  # noqa: F401
    from transformers import AutoModelForCausalLM

    check_model_dir(model_path)
    if adapter_path is not None and not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise UserError(f"adapter directory {adapter_path!r} has no adapter_config.json")
    device, dtype = pick_device_dtype(device)
    tokenizer = load_tokenizer_for(model_path, adapter_path, trust_remote_code)
    quantization = quantization_config(quantization_bit, dtype)
    placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **placement)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
    except LOAD_ERRORS as error:
        raise cannot_load(model_path, error, adapter_path) from None
    if quantization is None:
        model.to(device)  # a quantised model was placed as it loaded, and cannot be moved
    elif device.type == "cpu":
        keep_4bit_layout(model, lambda module: module.out_features % 32 != 0
                         or module.in_features % module.weight.quant_state.blocksize != 0)
    return model.eval(), tokenizer


def load_for_training(args, device, dtype):
    """The base model (4-bit NF4 with double quantisation unless --quantization_bit 16), frozen,
    with LoRA on every linear layer but lm_head (PEFT's "all-linear")."""
    import baichuan  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(args.quantization_bit, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": device},
            trust_remote_code=args.trust_remote_code,
        )
    except LOAD_ERRORS as error:
        raise cannot_load(args.model_name_or_path, error) from None
    keep_4bit_layout(model)  # an evaluation forward would break the LoRA gradients
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # PEFT freezes the base; prepare_model_for_kbit_training is not used because it would copy the
    # embeddings and the head to fp32 (2 GB each for Baichuan2-7B)
    lora = LoraConfig(r=args.lora_dim, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)

"""Baichuan2 for current transformers: config, model, tokenizer and chat helpers.

Importing the package registers the classes with the Auto* factories, and marks them so that
every directory saved with `save_pretrained` also carries `auto_map` and the code files, which
lets a plain transformers install load it with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_baichuan import BaichuanConfig
from .modeling_baichuan import BaichuanForCausalLM, BaichuanModel
from .tokenization_baichuan import BaichuanTokenizer

AutoConfig.register(BaichuanConfig.model_type, BaichuanConfig, exist_ok=True)
AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)
BaichuanConfig.register_for_auto_class()
BaichuanModel.register_for_auto_class("AutoModel")
BaichuanForCausalLM.register_for_auto_class("AutoModelForCausalLM")
BaichuanTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanModel", "BaichuanTokenizer"]

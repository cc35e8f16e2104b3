"""The preference stage of train.py (--stage dpo): its data, its model's starting point, the
reference log-probabilities, and its step functions for train.py's loop (PreferenceStage, beside
utils.training.steps.SftStage).

The reference is the starting point: the base with the new adapter switched off, or, with
--adapter, the SFT adapter as loaded, which the stage goes on training (as TRL's DPOTrainer does
with a PEFT model that already has an adapter). Either way its log-probabilities are computed once,
before the first step, in a pass over the training and test pairs, and cached in
output_dir/reference_logps.safetensors under a fingerprint of the pairs and the starting point; a
resumed run reads them back (they cannot be recomputed from a trained adapter).
"""

import os
from collections import defaultdict

import torch
import torch.distributed as dist

from utils.signals import STOP, stall_point
from utils.training.config import REFERENCE_FILE
from utils.training.distributed import is_main_process, print_rank_0


def load_pairs(config, rows: dict, tokenizer):
    """(the training pairs; the training set: those pairs, packed with --pref_packing; the test pairs
    or None; the roles they play). `rows`: the rows of --train_path and --test_path (read_pairs)."""
    from transformers import GenerationConfig

    from utils.pairs import PackedPairs, PairDataset

    generation_config = GenerationConfig.from_pretrained(config.model.model_name_or_path)
    max_len = config.data.max_len

    def load(split):
        paths = getattr(config.data, f"{split}_path")
        dataset = PairDataset(rows[split], tokenizer, generation_config, max_len, source=", ".join(paths))
        if dataset.too_long:
            print_rank_0(f"{', '.join(paths)}: {dataset.too_long} pairs dropped (their system prompt fills "
                         f"--max_len {max_len})")
        return dataset

    pairs = load("train")
    test_pairs = load("test") if rows["test"] else None
    print_rank_0(f"train: {len(pairs)} pairs" + (f", test: {len(test_pairs)} pairs" if test_pairs else ""))
    train_set = pairs
    if config.preference.pref_packing:
        train_set = PackedPairs(pairs, max_len)
        print_rank_0(f"packed into {len(train_set)} rows of at most {max_len} tokens")
    return pairs, train_set, test_pairs, pairs.roles


def start_model(config, device, dtype):
    """The model to train: the base with a new LoRA adapter, or with --adapter the SFT adapter made
    trainable. Dropout is switched off, as TRL's DPOTrainer does by default: the policy's
    log-probabilities would otherwise be noisier than the reference's."""
    from utils.models import LOAD_ERRORS, cannot_load, load_base_model, load_for_training, prepare_for_adapter

    adapter = config.preference.adapter
    if adapter is None:
        model = load_for_training(config.model, config.lora, device, dtype, log=print_rank_0)
    else:
        from peft import PeftModel

        base = prepare_for_adapter(load_base_model(config.model.model_name_or_path, device, dtype,
                                                   config.model.quantization_bit, config.model.trust_remote_code,
                                                   print_rank_0), config.model.gradient_checkpointing)
        try:
            model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        except LOAD_ERRORS as error:
            raise cannot_load(config.model.model_name_or_path, error, adapter) from None
        print_rank_0(f"training on from the adapter {adapter} (its rank and alpha; --lora_* are not used)")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _batches(dataset, indices, size: int, pad_id: int, packed: bool, max_len: int):
    """This process's share of a pairs dataset in batches of `size` items sorted by length (pairs,
    or rows packed from the share), so that a pass pads little."""
    from utils.pairs import collate_pairs, pack_pairs

    items = [dataset[i] for i in indices]
    if packed:
        items = pack_pairs(items, max_len)
        lengths = [len(row["prefix"]) for row in items]
    else:
        lengths = [len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in items]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    return [collate_pairs([items[i] for i in order[j : j + size]], pad_id) for j in range(0, len(order), size)]


def reference_tables(config, model, pairs, test_pairs, pad_id: int, device, rank: int, world_size: int) -> dict:
    """{"train": (n, 2), "test": (m, 2)} reference log-probabilities of the pairs (utils.preference
    reference_logps), read from the cache in output_dir when it fits, else computed (each process its
    share) and cached. Empty when the loss needs no reference."""
    from utils.preference import NEEDS_REFERENCE, cached_reference, reference_fingerprint, reference_logps

    preference = config.preference
    if not NEEDS_REFERENCE[preference.pref_loss]:
        return {}
    sets = {"train": pairs, **({"test": test_pairs} if test_pairs is not None else {})}
    model_ = config.model
    fingerprint = reference_fingerprint([e for dataset in sets.values() for e in dataset.examples],
                                        model_.model_name_or_path, model_.quantization_bit, preference.adapter,
                                        sorted((name, len(d)) for name, d in sets.items()))
    size = config.optim.per_device_eval_batch_size

    def compute():
        tables = {}
        for name, dataset in sets.items():
            mine = range(rank, len(dataset), world_size)
            batches = _batches(dataset, mine, size, pad_id, preference.pref_packing, config.data.max_len)
            tables[name] = reference_logps(model, batches, len(dataset), device,
                                           disable_adapter=preference.adapter is None).cpu()
        return tables

    os.makedirs(config.output.output_dir, exist_ok=True)
    path = os.path.join(config.output.output_dir, REFERENCE_FILE)
    tables, cached = cached_reference(path, fingerprint, compute, write=is_main_process())
    print_rank_0(f"reference log-probabilities {'read from' if cached else 'computed and cached in'} {path}")
    return tables


def chosen_tokens(batch: dict) -> int:
    """The labelled tokens of a batch's chosen replies (collate_pairs' sequences 0 .. n-1)."""
    sequences = batch["sequence_ids"]
    return int(((sequences >= 0) & (sequences < len(batch["pair_index"]))).sum())


class PreferenceStage:
    """The preference stage's step functions for train.py's loop (the same interface as
    utils.training.steps.SftStage). A step's loss is the mean over its pairs, over all micro-batches
    and processes (orpo's NLL the mean over its chosen-reply tokens: utils.preference.batch_loss)."""

    def __init__(self, preference, reference: dict, test_pairs, pad_id: int, eval_batch_size: int, device,
                 rank: int, world_size: int):
        self.device = device
        self.kind, self.beta, self.gamma = preference.pref_loss, preference.pref_beta, preference.simpo_gamma
        self.reference, self.pad_id = reference, pad_id
        self.step_chosen_tokens = 0
        self.window = defaultdict(float)  # metric name -> sum over the pairs since the last report
        self.test_batches = []
        if test_pairs is not None:
            mine = range(rank, len(test_pairs), world_size)
            self.test_batches = _batches(test_pairs, mine, eval_batch_size, pad_id, False, 0)
        self.eval_metrics = {}

    def collate(self, items):
        from utils.pairs import collate_pairs

        return collate_pairs(items, self.pad_id)

    @staticmethod
    def counts(items) -> tuple[int, int]:
        from utils.pairs import pair_counts

        return pair_counts(items)

    def start(self, micro_batches, device) -> tuple[int, int | None]:
        """(the step's pairs over all processes, the signal that stops the run or None), agreed in one
        all_reduce as utils.training.steps.start_step does; the step's chosen-reply tokens are kept."""
        import signal

        counts = torch.tensor([sum(len(b["pair_index"]) for b in micro_batches),
                               sum(chosen_tokens(b) for b in micro_batches),
                               STOP.first == signal.SIGINT, STOP.first == signal.SIGTERM],
                              dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        pairs, self.step_chosen_tokens, interrupted, terminated = (int(v) for v in counts.tolist())
        return pairs, signal.SIGINT if interrupted else signal.SIGTERM if terminated else None

    def _loss(self, model, batch, split: str, step_pairs: int, step_chosen_tokens: int):
        from utils.preference import batch_loss, sequence_logps

        n = len(batch["pair_index"])
        logps, counts = sequence_logps(model, batch, 2 * n)
        reference = self.reference[split][batch["pair_index"]].T.reshape(-1) if self.reference else None
        return batch_loss(self.kind, self.beta, logps, counts, reference, step_pairs, step_chosen_tokens, self.gamma)

    def train(self, engine, micro_batches, step_pairs: int, device) -> torch.Tensor:
        """One optimizer step; returns the step's mean loss x its pairs (so utils.training.steps'
        Throughput, given the pairs as the count, reports the mean loss per pair). The loss is
        multiplied by the world size because ZeRO averages the processes' gradients (steps.train_step)."""
        world_size = dist.get_world_size()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in micro_batches:
            loss, sums = self._loss(engine, batch, "train", step_pairs, self.step_chosen_tokens)
            engine.backward(loss * world_size, scale_wrt_gas=False)
            stall_point("step")
            engine.step()
            total += loss.detach().double() * step_pairs
            for name, value in sums.items():
                self.window[name] += value.item()
            self.window["pairs"] += len(batch["pair_index"])
        return total

    def metrics(self) -> dict[str, float]:
        """TRL's metrics, means over the pairs of all processes since the last call."""
        names = sorted(self.window)
        totals = torch.tensor([self.window[name] for name in names], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        values = dict(zip(names, totals.tolist(), strict=True))
        pairs = max(values.pop("pairs", 0), 1)
        self.window.clear()
        return {name: value / pairs for name, value in values.items()}

    @torch.no_grad()
    def evaluate(self, engine, test_batches, device) -> tuple[float, None]:
        """The mean loss of the test pairs over all processes (`test_batches`: this process's share,
        the stage's own), no perplexity; their metrics go to `eval_metrics`, named as TRL's evaluation
        logs them (eval_rewards/margins, ...)."""
        model = getattr(engine, "module", engine)
        model.eval()
        totals = defaultdict(float)
        for batch in test_batches:
            stall_point("eval")
            n = len(batch["pair_index"])
            loss, sums = self._loss(model, batch, "test", n, max(1, chosen_tokens(batch)))  # the batch's mean
            totals["loss"] += loss.item() * n
            for name, value in sums.items():
                totals[name] += value.item()
            totals["pairs"] += n
        model.train()
        names = sorted(totals)
        values = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(values)
        values = dict(zip(names, values.tolist(), strict=True))
        pairs = max(values.pop("pairs"), 1)
        self.eval_metrics = {f"eval_{name}": value / pairs for name, value in values.items() if name != "loss"}
        return values["loss"] / pairs, None

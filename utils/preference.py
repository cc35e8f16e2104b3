"""Preference losses on pairs (utils.pairs): the log-probabilities of replies, the losses
sigmoid (DPO), ipo, orpo and simpo, their metrics under TRL's names, and the reference
log-probabilities, computed once in a pass over the data and cached.

    sigmoid  DPO (Rafailov et al. 2023): -log σ(β((π_c - ref_c) - (π_r - ref_r))), sums over the reply.
    ipo      IPO (Azar et al. 2023), as TRL's DPOTrainer has it: the log-ratios averaged over the
             reply's tokens, ((Δ_c/|c| - Δ_r/|r|) - 1/(2β))².
    orpo     ORPO (Hong et al. 2024): the chosen reply's NLL (mean over its tokens) - β log σ(log odds),
             log odds = log(p_c/(1-p_c)) - log(p_r/(1-p_r)), p the reply's mean per-token probability.
             No reference model.
    simpo    SimPO (Meng et al. 2024): -log σ(β(π_c/|c| - π_r/|r|) - γ). No reference model.

π is the summed log-probability of a reply's tokens (its text and its eos). The metrics are TRL's:
rewards/chosen and rewards/rejected (β x the log-ratio for sigmoid and ipo; β x the mean
log-probability for orpo and simpo, as TRL's experimental ORPO and CPO trainers log them),
rewards/accuracies, rewards/margins, logps/chosen and logps/rejected (sums for sigmoid and ipo,
per-token means for orpo and simpo, as there), and for orpo nll_loss, log_odds_ratio and log_odds_chosen.

Weighting over a step: the preference term is the mean over the step's pairs (all micro-batches and
ranks), and orpo's NLL is weighted by tokens, the mean over the step's chosen-reply tokens, as the
SFT loss of train.py is.
"""

import hashlib
import math
import os

import torch
import torch.nn.functional as F

from utils.training.config import PREF_LOSSES as LOSSES  # the flags' choices, named there

NEEDS_REFERENCE = {"sigmoid": True, "ipo": True, "orpo": False, "simpo": False}


def causal_lm(model):
    """The BaichuanForCausalLM under a DeepSpeed engine and a PEFT wrapper (the LoRA layers sit
    inside it, so calling it runs the adapter)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TokenLogProbs(torch.autograd.Function):
    """log p(target) at each of n positions, (n,) in fp32, under Baichuan2's L2-normalised head
    (frozen: LoRA never trains lm_head), a chunk of positions at a time.

    Written here because the model's own kernel (NormHeadLoss) returns one summed loss, whose
    gradient is one scalar, while a preference loss weighs every reply differently; calling it once
    a reply re-reads the whole head (125,696 x hidden) for a few dozen positions. As there, nothing of
    size n x vocab is kept: the gradient with respect to the hidden states is computed in the same
    pass, (onehot - softmax) x inv_norm @ weight per position, and backward scales each position's
    row by its incoming gradient (a position's log-probability depends on its own hidden state only).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_norm, chunk: int, with_grad: bool):
        from baichuan.modeling_baichuan import _chunk_logits, _softmax_

        grad_hidden = torch.empty_like(hidden) if with_grad and ctx.needs_input_grad[0] else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = _chunk_logits(h, weight, inv_norm)  # (c, vocab)
            target_logits = logits.gather(-1, t[:, None])
            lse = _softmax_(logits)  # logits hold the softmax now
            out[start : start + chunk] = (target_logits - lse).squeeze(-1)
            if grad_hidden is not None:
                grad = logits.neg_()
                grad[torch.arange(t.shape[0], device=t.device), t] += 1
                grad_hidden[start : start + chunk] = grad.mul_(inv_norm).to(weight.dtype) @ weight
            del logits
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out[:, None].to(grad_hidden.dtype), None, None, None, None, None


def sequence_logps(model, batch: dict, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, token count) of each of the batch's sequences (collate_pairs'
    sequence_ids), each (n_sequences,) in fp32: the backbone, then TokenLogProbs at the labelled
    positions only (the model's forward returns either the batch's mean loss or all (b, s, vocab)
    logits)."""
    from baichuan.modeling_baichuan import LOSS_CHUNK_ELEMENTS

    lm = causal_lm(model)
    head = lm.lm_head.weight
    if head.requires_grad and torch.is_grad_enabled():
        raise ValueError("the preference losses keep lm_head frozen (LoRA does not train it)")
    device = head.device
    hidden = lm.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      position_ids=batch["position_ids"].to(device), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
    sequences = batch["sequence_ids"][:, 1:].to(device)
    keep = targets != -100
    hidden, targets, sequences = hidden[:, :-1][keep], targets[keep], sequences[keep]
    chunk = max(1, LOSS_CHUNK_ELEMENTS // head.shape[0])
    token_logps = TokenLogProbs.apply(hidden, head, targets, lm.lm_head.inv_norm(), chunk, torch.is_grad_enabled())
    logps = torch.zeros(n_sequences, dtype=torch.float32, device=device).index_add(0, sequences, token_logps)
    counts = torch.zeros(n_sequences, dtype=torch.float32, device=device).index_add_(
        0, sequences, torch.ones_like(token_logps))
    return logps, counts


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(kind: str, beta: float, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Per pair: (the preference loss (n,), orpo's chosen-reply NLL summed over its tokens (n,) or
    None, the metrics (name -> (n,) values, detached)).

    `logps` and `counts` are sequence_logps' (chosen replies, then rejected ones); `reference` the
    reference's summed log-probabilities in the same order (ignored by orpo and simpo).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}: one of {', '.join(LOSSES)}")
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = counts.clamp_min(1).chunk(2)
    nll, extra = None, {}
    if NEEDS_REFERENCE[kind]:
        if reference is None:
            raise ValueError(f"the {kind} loss needs the reference log-probabilities")
        ref_chosen, ref_rejected = reference.to(logps).chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:  # ipo, averaged over the reply's tokens as TRL does (its comment: confirmed with the IPO authors)
            losses = (chosen_ratio / chosen_len - rejected_ratio / rejected_len - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward, shown = beta * chosen_ratio, beta * rejected_ratio, (chosen, rejected)
    else:
        chosen_mean, rejected_mean = chosen / chosen_len, rejected / rejected_len
        if kind == "orpo":
            log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
            ratio = F.logsigmoid(log_odds)
            losses, nll = -beta * ratio, -chosen
            extra = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
        else:  # simpo
            losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
        chosen_reward, rejected_reward, shown = beta * chosen_mean, beta * rejected_mean, (chosen_mean, rejected_mean)
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    metrics = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
               "rewards/accuracies": (chosen_reward > rejected_reward).float(),
               "rewards/margins": chosen_reward - rejected_reward,
               "logps/chosen": shown[0].detach(), "logps/rejected": shown[1].detach(), **extra}
    return losses, nll, metrics


def batch_loss(kind: str, beta: float, logps, counts, reference, step_pairs: int, step_chosen_tokens: int,
               gamma: float = 0.5) -> tuple[torch.Tensor, dict]:
    """A micro-batch's share of its step's loss, and its metric sums (name -> sum over its pairs).

    The preference term is summed over the micro-batch's pairs and divided by the step's pair count;
    orpo's NLL is summed over its chosen-reply tokens and divided by the step's count of them, so
    summing the micro-batches' losses (over ranks too) gives the step's mean loss."""
    losses, nll, metrics = pair_losses(kind, beta, logps, counts, reference, gamma)
    loss = losses.sum() / step_pairs
    sums = {name: values.sum() for name, values in metrics.items()}
    if nll is not None:
        nll_part = nll.sum() / step_chosen_tokens
        loss = loss + nll_part
        sums["nll_loss"] = nll_part.detach() * step_pairs  # a step-mean, spread over the pairs like the others
    return loss, sums


# ---------------------------------------------------------------- the reference


def reference_fingerprint(pairs, *identity) -> str:
    """A digest of the pairs' token ids and what names the reference model (path, adapter, ...)."""
    digest = hashlib.sha256(repr(identity).encode())
    for pair in pairs:
        for key in ("prompt", "chosen", "rejected"):
            digest.update(pair[key].tobytes() if hasattr(pair[key], "tobytes") else repr(list(pair[key])).encode())
            digest.update(b"|")
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(model, batches, n_pairs: int, device, disable_adapter: bool = True) -> torch.Tensor:
    """(n_pairs, 2) summed log-probabilities of each pair's chosen and rejected reply under the
    reference, indexed by the pairs' dataset index, from `batches` (collate_pairs' output; with
    several processes each gives its share, and the shares are summed over them).

    With LoRA the reference is the same model with the adapter being trained switched off (PEFT's
    disable_adapter), so no second model is held; `disable_adapter=False` keeps the model as it is
    (before its first step it is the starting point, an SFT adapter included)."""
    import contextlib

    import torch.distributed as dist

    peft_model = getattr(model, "module", model)
    was_training = peft_model.training
    peft_model.eval()
    table = torch.zeros(n_pairs, 2, dtype=torch.float64, device=device)
    context = peft_model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    try:
        with context:
            for batch in batches:
                n = len(batch["pair_index"])
                logps, _ = sequence_logps(peft_model, batch, 2 * n)
                table[batch["pair_index"].to(device)] = logps.view(2, n).T.double()
    finally:
        peft_model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
    return table


def cached_reference(path: str, fingerprint: str, compute, write: bool = True) -> tuple[dict, bool]:
    """The reference tables (name -> tensor, e.g. "train" and "test") stored at `path` when its
    fingerprint matches, else `compute()`'s, then stored there (safetensors, written atomically, when
    `write`: by one process of several); and whether they came from the cache."""
    from safetensors import safe_open
    from safetensors.torch import save

    from utils.files import write_atomic

    if os.path.isfile(path):
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    return {name: f.get_tensor(name) for name in f.keys()}, True
        except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            pass
    tables = compute()
    if write:
        write_atomic(path, save({name: table.cpu().contiguous() for name, table in tables.items()},
                                metadata={"fingerprint": fingerprint}))
    return tables, False

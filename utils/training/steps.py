"""One token-weighted optimizer step, the throughput of the steps, and the test-set evaluation."""

import math
import signal
import time

import torch
import torch.distributed as dist

from utils.signals import STOP, stall_point
from utils.training.distributed import is_main_process


def labelled_tokens(batch: dict) -> int:
    """The positions the model's loss counts: those whose next token is labelled."""
    return int((batch["labels"][:, 1:] != -100).sum())


def start_step(micro_batches: list[dict], device) -> tuple[int, int | None]:
    """(labelled tokens of the whole step, over its micro-batches and all ranks; the signal that
    asked the run to stop, or None), agreed by all ranks in one all_reduce at the step boundary,
    so that the count is known before the first backward and every rank stops at the same step."""
    counts = torch.tensor([sum(labelled_tokens(b) for b in micro_batches), STOP.first == signal.SIGINT,
                           STOP.first == signal.SIGTERM], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    tokens, interrupted, terminated = counts.tolist()
    return int(tokens), signal.SIGINT if interrupted else signal.SIGTERM if terminated else None


def train_step(engine, micro_batches: list[dict], step_tokens: int, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the sum of their token losses.

    The step's gradient is that of (sum of the labelled-token losses over all its micro-batches and
    ranks) / step_tokens, as in the HF Trainer since 4.46: each micro-batch's loss is divided by the
    step's count (num_items_in_batch), not by its own, so a micro-batch weighs by its tokens.
    DeepSpeed would also divide by the accumulation steps (turned off: scale_wrt_gas=False), and
    ZeRO averages the ranks' gradients where the sum is wanted (undone: x world size).
    """
    world_size = dist.get_world_size()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = engine(**batch, num_items_in_batch=step_tokens).loss
        engine.backward(loss * world_size, scale_wrt_gas=False)
        stall_point("step")
        engine.step()
        total += loss.detach().double() * step_tokens
    return total


class Throughput:
    """The per-token training loss, samples/s and tokens/s over the steps since the last report,
    timed over the training steps alone: evaluation and saving between them do not count.

    Tokens are the samples' own (utils.data.sample_counts): padding excluded, and a shared prompt
    counted once per sample that uses it, so the figure means the same with and without --packing.
    """

    def __init__(self, device):
        self.device = device
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # (loss sum, samples, tokens)
        self.labelled = 0  # over all ranks already
        self.seconds = 0.0
        self.started = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self, loss_sum: torch.Tensor, step_tokens: int, samples: int, tokens: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the next step's all_reduce would wait for it anyway
        self.seconds += time.perf_counter() - self.started
        self.totals += torch.stack([loss_sum, loss_sum.new_tensor(samples), loss_sum.new_tensor(tokens)])
        self.labelled += step_tokens

    def report(self) -> tuple[float, float, float]:
        """(mean loss per labelled token, samples/s, tokens/s), over all ranks; then starts anew."""
        dist.all_reduce(self.totals)
        loss_sum, samples, tokens = self.totals.tolist()
        result = loss_sum / max(self.labelled, 1), samples / self.seconds, tokens / self.seconds
        self.totals.zero_()
        self.labelled, self.seconds = 0, 0.0
        return result


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float]:
    """Token-weighted mean loss over the whole test set (all ranks), and its perplexity. Rank 0
    shows a progress bar of its share (on the 7B model a pass takes minutes)."""
    from tqdm import tqdm

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, labelled tokens)
    for batch in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not is_main_process()):
        stall_point("eval")
        batch = {k: v.to(device) for k, v in batch.items()}
        count = labelled_tokens(batch)
        loss = model(**batch).loss
        totals[0] += loss.double() * count
        totals[1] += count
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    mean = (totals[0] / totals[1].clamp_min(1)).item()
    return mean, math.exp(min(mean, 50.0))

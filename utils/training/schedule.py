"""Which optimizer steps a run takes: how many per epoch and in all, this rank's micro-batches of
each in the order an uninterrupted run takes them (so a resumed run takes the same ones), and
whether a checkpoint already ends the run."""

from utils.cli import UserError
from utils.data import length_grouped_batches


class Schedule:
    def __init__(self, lengths: list[int], optim, world_size: int, rank: int, source: str):
        """`lengths`: of the training rows; `optim`: an OptimConfig; `source`: the files, for errors."""
        self.lengths, self.optim, self.world_size, self.rank = lengths, optim, world_size, rank
        batch, accumulation = optim.per_device_train_batch_size, optim.gradient_accumulation_steps
        self.steps_per_epoch = len(length_grouped_batches(lengths, batch, optim.seed, 0, world_size)) // accumulation
        if self.steps_per_epoch == 0:
            raise UserError(f"{source}: {len(lengths)} rows make no full optimizer step "
                            f"(batch {batch} x {world_size} processes x {accumulation} accumulation)")
        total = self.steps_per_epoch * optim.num_train_epochs
        self.total_steps = min(total, optim.max_steps) if optim.max_steps > 0 else total

    def is_complete(self, state: dict) -> bool:
        """Whether the trainer state of a checkpoint already ends the run: at max_steps, or at the
        end of the last epoch (of this run: it may ask for fewer epochs than the checkpoint had)."""
        last_epoch_done = (state["epoch"] + 1 >= self.optim.num_train_epochs
                           and state["step_in_epoch"] == self.steps_per_epoch)
        return state["global_step"] >= self.total_steps or last_epoch_done

    def ends_epoch(self, step_in_epoch: int) -> bool:
        """Whether the step of this index (from 0) is its epoch's last."""
        return step_in_epoch + 1 == self.steps_per_epoch

    def steps(self, state: dict):
        """Yield (epoch, step in epoch, this rank's micro-batches as lists of row indices) for every
        step after the trainer state `state`."""
        accumulation = self.optim.gradient_accumulation_steps
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        if start_step == self.steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        for epoch in range(start_epoch, self.optim.num_train_epochs):
            batches = length_grouped_batches(self.lengths, self.optim.per_device_train_batch_size, self.optim.seed,
                                             epoch, self.world_size, self.rank)
            for step in range(start_step if epoch == start_epoch else 0, self.steps_per_epoch):
                yield epoch, step, batches[step * accumulation : (step + 1) * accumulation]

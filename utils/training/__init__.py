"""What train.py needs beside its loop, one module per concern:

    utils.training.config       the typed training config (TrainConfig and its sections), built from the
                                arguments once and checked in one place
    utils.training.distributed  the process group, the rank helpers
    utils.training.deepspeed_config  reading ds_config.json and filling its "auto" values from the config
    utils.training.sizes        parameter counts and the per-GPU memory estimate of --dry_run
    utils.training.schedule     which optimizer steps a run takes, on each rank, and when it is complete
    utils.training.steps        one token-weighted optimizer step, its throughput, the test-set evaluation
    utils.training.preference_steps  the preference stage (--stage dpo): pairs, the reference, its steps
    utils.training.checkpoints  checkpoints that resume exactly, the newest few and the best kept
    utils.training.manifest     what makes a checkpoint complete (its manifest, its trainer state), checked
                                by every reader; no torch, for merge_params.py
    utils.training.storage      where the checkpoints live: one shared folder or a copy on each node's disk,
                                found at start-up; the lock on each copy

Nothing is imported here: `from utils.training.steps import train_step`, and so on.
"""

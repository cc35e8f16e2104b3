"""What makes a checkpoint complete, and the check that every reader of one makes.

A checkpoint `epoch-E-step-S/` is complete only with `manifest.json`, written last, which lists
every file of the checkpoint with its size and the ranks whose optimizer partitions it holds.
"latest", "best", --save_total_limit, resuming and merge_params.py trust a checkpoint only when
every listed file is there at its size and its trainer_state.json is what train.py writes, with
the step of the folder's name. Anything else is damaged: skipped with a note naming it, or
refused when named, never trusted. No torch here: merge_params.py checks before it loads.
"""

import json
import os
import re

from utils.cli import UserError
from utils.files import read_json, write_json

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)$")


def partition_name(rank: int, suffix: str = ".safetensors") -> str:
    """A rank's optimizer partition (its tensors; with suffix ".json", the rest of its state)."""
    return f"optimizer-rank{rank}{suffix}"


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch-{epoch + 1}-step-{global_step}"


def write_manifest(folder: str, ranks: list[int], world_size: int) -> None:
    """List every file under `folder` with its size, last, after everything else is written."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    write_json(os.path.join(folder, MANIFEST),
               {"files": dict(sorted(files.items())), "ranks": sorted(ranks), "world_size": world_size})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# key -> (test, what it must be); what train.py writes and resume reads
STATE_TYPES = {
    "global_step": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer of at least 0"),
    "step_in_epoch": (lambda v: _is_int(v) and v >= 0, "an integer of at least 0"),
    "steps_per_epoch": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "an integer of at least 1"),
    "scheduler": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}
OPTIONAL_STATE_TYPES = {
    "eval_loss": (lambda v: v is None or _is_number(v), "a number or null"),
    "ppl": (lambda v: v is None or _is_number(v), "a number or null"),
    "best_metric": (lambda v: v is None or _is_number(v), "a number or null"),
    "best_model_checkpoint": (lambda v: v is None or (isinstance(v, str) and CHECKPOINT_NAME.match(v)),
                              "a checkpoint's name or null"),
    "saved_at": (_is_number, "a number"),
}


def trainer_state_problem(state, name: str) -> str | None:
    """What is wrong with a checkpoint's trainer state (None: nothing), for the folder `name`."""
    if not isinstance(state, dict):
        return "must hold a JSON object"
    missing = [key for key in STATE_TYPES if key not in state]
    if missing:
        return f"no {', '.join(missing)}; not a checkpoint written by train.py"
    for types, required in ((STATE_TYPES, True), (OPTIONAL_STATE_TYPES, False)):
        for key, (test, what) in types.items():
            if (required or key in state) and not test(state[key]):
                return f"{key} must be {what}, got {json.dumps(state[key])[:40]}"
    if state["step_in_epoch"] > state["steps_per_epoch"]:
        return f"step_in_epoch {state['step_in_epoch']} is past steps_per_epoch {state['steps_per_epoch']}"
    if state["global_step"] != state["epoch"] * state["steps_per_epoch"] + state["step_in_epoch"]:
        return (f"global_step {state['global_step']} is not epoch x steps_per_epoch + step_in_epoch "
                f"({state['epoch']} x {state['steps_per_epoch']} + {state['step_in_epoch']})")
    if name != checkpoint_name(state["epoch"], state["global_step"]):
        return (f"epoch {state['epoch']} and global_step {state['global_step']} do not match the folder's name "
                f"(they would be {checkpoint_name(state['epoch'], state['global_step'])})")
    return None


def checkpoint_problem(path: str, ranks=()) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (None: it can): no manifest, a listed file
    missing or of another size, a trainer state that is not train.py's, or, for each of `ranks`,
    no optimizer partition of that rank in it."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST}, which is written last: the save did not finish"
    try:
        manifest = read_json(manifest_path, "manifest")
    except UserError as error:
        return str(error).removeprefix(path + os.sep)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        return f"{MANIFEST} is not a manifest written by train.py"
    for name, size in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            return f"{name} is missing"
        if os.path.getsize(file_path) != size:
            return f"{name} is {os.path.getsize(file_path):,} bytes, the manifest says {size:,}"
    if TRAINER_STATE not in files:
        return f"no {TRAINER_STATE} in its {MANIFEST}"
    try:
        state = read_json(os.path.join(path, TRAINER_STATE), "trainer state")
    except UserError as error:
        return str(error).removeprefix(path + os.sep)
    problem = trainer_state_problem(state, os.path.basename(os.path.realpath(path)))  # `best` is a link
    if problem:
        return f"{TRAINER_STATE}: {problem}"
    for rank in ranks:
        if partition_name(rank) not in files:
            return f"no optimizer partition of rank {rank}"
    return None


def scan_checkpoints(output_dir: str) -> tuple[list[str], dict[str, str]]:
    """(the complete checkpoints in output_dir in the order they were written, {damaged name: why}).

    Ordered by when they were saved (by step where two have the same time), so the last is the
    newest of the run that resumed last, even when an abandoned run had gone further. Folders
    still under a temporary name are neither: they are being written, or were abandoned."""
    if not os.path.isdir(output_dir):
        return [], {}
    found, damaged = [], {}
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        path = os.path.join(output_dir, name)
        if not match or not os.path.isdir(path):
            continue
        problem = checkpoint_problem(path)
        if problem:
            damaged[name] = problem
            continue
        saved_at = read_json(os.path.join(path, TRAINER_STATE)).get("saved_at", 0)
        found.append((saved_at, int(match[2]), int(match[1]), name))
    return [os.path.join(output_dir, entry[-1]) for entry in sorted(found)], damaged


def damaged_note(damaged: dict[str, str], output_dir: str) -> str:
    """One line that names the damaged checkpoints that were skipped, and why."""
    return "note: skipped, as damaged or incomplete: " + "; ".join(
        f"{os.path.join(output_dir, name)} ({why})" for name, why in sorted(damaged.items()))

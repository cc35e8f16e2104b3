"""Issue 17, cases 12-15: a run owns its folder. Each test replays a case of the adversarial pass
against train.py or merge_params.py on the tiny model, and fails without its fix:

    12  two train.py runs in one --output_dir both went on; a checkpoint without an optimizer
        partition (but with its trainer_state.json) was taken as complete by `latest`
    13  an edited or damaged trainer_state.json was trusted (the wrong step, epoch -1, a null
        scheduler, a string step), or skipped without a word
    14  a full disk gave a safetensors traceback and left the temporary folder behind
    15  two merge_params.py into one destination: one died with a FileNotFoundError traceback

One process, one OpenMP thread; one short reference run (4 steps, checkpoints at 2 and 4).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.]+)", re.M)
TIMEOUT = 120


def child_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run(command, check=True, **kwargs):
    proc = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False, **kwargs)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(output)}


def one_error_line(proc, *needles) -> str:
    """stderr holds one `error:` line, besides progress bars and `note:` lines; no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", proc.stderr)  # tqdm's cursor moves
    lines = [line for line in text.replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\d+%\|", line) and not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    run([sys.executable, "data_helper.py", "--train_out", str(out / "train.jsonl"), "--test_out", str(out / "test.jsonl")])
    return out


def train_command(model_dir, samples, out, *extra) -> list[str]:
    return [sys.executable, "train.py", "--model_name_or_path", str(model_dir),
            "--train_path", str(samples / "train.jsonl"), "--test_path", str(samples / "test.jsonl"),
            "--output_dir", str(out), "--max_len", "384", "--max_src_len", "64", "--per_device_train_batch_size", "8",
            "--learning_rate", "5e-3", "--show_loss_step", "1", "--save_model_step", "2", "--max_steps", "4",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_model_dir, samples, tmp_path_factory):
    """One uninterrupted run: (output folder, losses by step)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run(train_command(tiny_model_dir, samples, out))
    return out, losses(proc.stdout)


def copy_run(reference, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference[0], out, symlinks=True)
    return out


def edit_state(checkpoint: Path, manifest_too: bool = True, **changes) -> None:
    """Change trainer_state.json; with `manifest_too`, write the manifest anew, as if the edit had been
    made before the save finished, so that only the check of the state itself can catch it."""
    from utils.training.manifest import write_manifest

    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))
    if manifest_too:
        (checkpoint / "manifest.json").unlink()
        write_manifest(str(checkpoint), [0], 1)


# ---------------------------------------------------------------- 12: two runs, one folder


def test_12_a_second_run_into_a_folder_in_use_stops_in_one_line_naming_the_first(tiny_model_dir, samples, tmp_path):
    """Before: both runs exited 0, and epoch-1-step-1 held one run's weights with the other's
    train_args.json."""
    out = tmp_path / "out"
    first = subprocess.Popen(train_command(tiny_model_dir, samples, out), cwd=REPO_ROOT, text=True,
                             env=child_env(ROLEPLAY_STALL_AT="step:1"), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        for line in first.stdout:  # parked after its first step's backward, holding the folder
            if "stalled at step" in line or time.monotonic() > deadline:
                break
        assert first.poll() is None
        second = run(train_command(tiny_model_dir, samples, out, "--learning_rate", "1e-3"), check=False)
        one_error_line(second, f"--output_dir {str(out)!r} is in use by another run", f"pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not list(out.glob("epoch-*"))  # the second wrote nothing


def test_12_a_checkpoint_without_an_optimizer_partition_is_not_complete(reference, tmp_path):
    """Before: epoch-1-step-7 with a trainer_state.json but no optimizer-rank0.safetensors was
    taken as complete by `latest`."""
    from utils.training.checkpoints import list_checkpoints
    from utils.training.manifest import scan_checkpoints

    out = copy_run(reference, tmp_path)
    (out / "epoch-1-step-4" / "optimizer-rank0.safetensors").unlink()
    assert [Path(p).name for p in list_checkpoints(str(out))] == ["epoch-1-step-2"]
    assert scan_checkpoints(str(out))[1] == {"epoch-1-step-4": "optimizer-rank0.safetensors is missing"}
    # a file cut short is caught by its size; one without a manifest (the save did not finish) too
    with open(out / "epoch-1-step-2" / "adapter_model.safetensors", "r+b") as f:
        f.truncate(100)
    (out / "epoch-1-step-4" / "manifest.json").unlink()
    complete, damaged = scan_checkpoints(str(out))
    assert complete == [] and "adapter_model.safetensors is 100 bytes, the manifest says" in damaged["epoch-1-step-2"]
    assert damaged["epoch-1-step-4"].startswith("no manifest.json")


# ---------------------------------------------------------------- 13: trainer_state.json is checked


@pytest.mark.parametrize("changes, problem", [
    ({"global_step": 3}, "global_step 3 is not epoch x steps_per_epoch + step_in_epoch"),
    ({"global_step": 3, "step_in_epoch": 3}, "do not match the folder's name"),
    ({"epoch": -1}, "epoch must be an integer of at least 0, got -1"),
    ({"global_step": "4"}, 'global_step must be an integer of at least 1, got "4"'),
    ({"scheduler": "none"}, 'scheduler must be an object or null, got "none"'),
    ({"best_metric": "low"}, "best_metric must be a number or null"),
], ids=["step-not-its-epoch", "step-not-the-folders", "negative-epoch", "string-step", "string-scheduler",
        "string-metric"])  # fmt: skip
def test_13_an_edited_trainer_state_is_damaged_and_skipped(reference, tmp_path, changes, problem):
    """Before: global_step 3 in epoch-1-step-14 "resumed at step 3"; epoch -1 trained on to another
    loss; a string step gave a TypeError traceback after a step was trained."""
    from utils.training.manifest import scan_checkpoints

    out = copy_run(reference, tmp_path)
    edit_state(out / "epoch-1-step-4", **changes)
    complete, damaged = scan_checkpoints(str(out))
    assert [Path(p).name for p in complete] == ["epoch-1-step-2"]
    assert damaged["epoch-1-step-4"].startswith("trainer_state.json: ") and problem in damaged["epoch-1-step-4"], \
        damaged


def test_13_latest_skips_a_damaged_checkpoint_with_a_note_and_resumes_exactly(reference, tiny_model_dir, samples,
                                                                               tmp_path):
    """Before: invalid JSON in the newest checkpoint's state fell back to another without a word."""
    from utils.training.manifest import write_manifest

    out = copy_run(reference, tmp_path)
    (out / "epoch-1-step-4" / "trainer_state.json").write_text('{"global_step": ')
    (out / "epoch-1-step-4" / "manifest.json").unlink()
    write_manifest(str(out / "epoch-1-step-4"), [0], 1)  # so that the state itself is what is caught
    proc = run(train_command(tiny_model_dir, samples, out, "--resume_from_checkpoint", "latest"))
    note, = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert f"{out / 'epoch-1-step-4'} (trainer_state.json:1: not valid JSON" in note
    assert f"resumed from {out / 'epoch-1-step-2'} at step 2" in proc.stdout
    assert losses(proc.stdout) == {step: reference[1][step] for step in (3, 4)}
    from utils.training.manifest import checkpoint_problem

    assert checkpoint_problem(str(out / "epoch-1-step-4")) is None  # written anew, whole


def test_13_a_named_damaged_checkpoint_or_a_null_scheduler_is_refused_before_training(reference, tiny_model_dir,
                                                                                      samples, tmp_path):
    """Before: a null scheduler gave a TypeError traceback after a step was trained."""
    out = copy_run(reference, tmp_path)
    edit_state(out / "epoch-1-step-2", manifest_too=False, epoch=-1)
    proc = run(train_command(tiny_model_dir, samples, out, "--resume_from_checkpoint", str(out / "epoch-1-step-2")),
               check=False)  # fmt: skip
    one_error_line(proc, "epoch-1-step-2", "is not a complete checkpoint", "trainer_state.json is ")
    edit_state(out / "epoch-1-step-4", scheduler=None)  # a consistent manifest: only the resume can tell
    proc = run(train_command(tiny_model_dir, samples, out, "--resume_from_checkpoint", str(out / "epoch-1-step-4"),
                             "--max_steps", "6"), check=False)  # fmt: skip
    one_error_line(proc, "epoch-1-step-4/trainer_state.json: no scheduler state")
    assert losses(proc.stdout) == {}  # no step trained


# ---------------------------------------------------------------- 14: a full disk


def can_mount() -> str | None:
    proc = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    return None if proc.returncode == 0 else f"no private mount namespace here: {proc.stderr.strip()[:200]}"


LIST_CHECKPOINTS = """
import json, os, sys
from utils.training.manifest import checkpoint_problem
out = sys.argv[1]
print("LISTING " + json.dumps({name: checkpoint_problem(os.path.join(out, name)) if name.startswith("epoch-") else None
                             for name in sorted(os.listdir(out))}))
"""


@pytest.mark.skipif(bool(can_mount()), reason=str(can_mount()))
def test_14_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing_half_written(tiny_model_dir, samples,
                                                                                    tmp_path):
    """Before: a 2 MB tmpfs gave a full ENOSPC traceback and left .tmp-epoch-1-step-6 behind. Here a
    tmpfs of 1 MB holds two checkpoints of the tiny model (about 330 kB each), not the third."""
    out = tmp_path / "out"
    out.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && shift && "$@"; rc=$?; python -c "$LISTING" "$OUT"; exit $rc'
    command = ["unshare", "-m", "sh", "-c", script, "full-disk", str(out),
               *train_command(tiny_model_dir, samples, out, "--save_model_step", "1", "--max_steps", "8")]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=child_env(LISTING=LIST_CHECKPOINTS, OUT=str(out)),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    line = one_error_line(proc, "cannot save a checkpoint: ", str(out), "No space left on device")
    listing = json.loads(proc.stdout.split("LISTING ", 1)[1])
    saved = [name for name in listing if name.startswith("epoch-")]
    assert saved and all(listing[name] is None for name in saved), listing  # every one complete
    failed = f"epoch-1-step-{len(saved) + 1}"
    assert failed in line and not [name for name in listing if name.startswith(".tmp-")], listing


# ---------------------------------------------------------------- 15: two merges, one destination


def test_15_a_merge_into_a_destination_in_use_stops_in_one_line_naming_the_holder(reference, tiny_model_dir,
                                                                                  tmp_path):
    """Before: of two merge_params.py into one destination, one died with a FileNotFoundError
    traceback (each removed the other's temporary folder). Here the other merge is this test,
    holding the destination's lock as a merge does."""
    from utils.lock import OutputLock

    merged = tmp_path / "merged"
    command = [sys.executable, "merge_params.py", "--ori_model_dir", str(tiny_model_dir),
               "--model_dir", str(reference[0] / "epoch-1-step-4"), "--save_model_dir", str(merged)]
    lock = OutputLock(str(tmp_path / ".merged.lock"), "the test's merge", "a test").acquire()
    try:
        proc = run(command, check=False)
    finally:
        lock.release()
    one_error_line(proc, f"--save_model_dir {str(merged)!r} is in use by another run", f"pid {os.getpid()} on ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, the lock file gone with its holder
    run(command)  # once it is free
    assert (merged / "config.json").is_file()
    one_error_line(run(command, check=False), "already exists")


def test_15_merge_refuses_a_damaged_checkpoint(reference, tiny_model_dir, tmp_path):
    out = copy_run(reference, tmp_path)
    with open(out / "epoch-1-step-4" / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    proc = run([sys.executable, "merge_params.py", "--ori_model_dir", str(tiny_model_dir),
                "--model_dir", str(out / "epoch-1-step-4"), "--save_model_dir", str(tmp_path / "merged")], check=False)
    one_error_line(proc, "is not a complete checkpoint", "adapter_model.safetensors is ")

"""Training across machines, simulated on one: two torchrun "nodes" of one process each on 127.0.0.1
(`--nnodes 2 --node_rank 0/1`), as a user with two machines would launch them.

"No shared filesystem": node 1 runs in a mount namespace of its own (`unshare -m`, as root), where
a folder of its own is bind-mounted over the run's --output_dir, so that each node sees only its
own disk there, as two cloud machines without NFS would, and node 1's disk outlives the run for
the resume. Where unshare is not permitted those tests are skipped with the reason.

One OpenMP thread a process, the tiny model, 4 optimizer steps (checkpoints at steps 2 and 4).
"""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.]+)", re.MULTILINE)
TIMEOUT = 120  # seconds a launch may take at the most (measured 15-25 s on the 2 shared cores)


def child_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(output)}


def can_unshare() -> str | None:
    """Why a private mount namespace cannot be had here, or None when it can."""
    try:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, check=False,
                              text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    return None if proc.returncode == 0 else f"no private mount namespace here: {proc.stderr.strip()[:200]}"


needs_unshare = pytest.mark.skipif(bool(can_unshare()), reason=str(can_unshare()))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    subprocess.run([sys.executable, "data_helper.py", "--train_out", str(out / "train.jsonl"),
                    "--test_out", str(out / "test.jsonl")], cwd=REPO_ROOT, env=child_env(), check=True,
                   capture_output=True)  # fmt: skip
    return out


def train_arguments(model_dir, samples, out, *extra) -> list[str]:
    """4 optimizer steps of 2 micro-batches of 4 rows per process, a checkpoint every 2."""
    return [
        "train.py",
        "--model_name_or_path", str(model_dir),
        "--train_path", str(samples / "train.jsonl"),
        "--test_path", str(samples / "test.jsonl"),
        "--output_dir", str(out),
        "--max_len", "384", "--max_src_len", "64",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--learning_rate", "5e-3",
        "--show_loss_step", "1",
        "--save_model_step", "2",
        "--max_steps", "4",
        *extra,
    ]  # fmt: skip


class Node:
    """One launcher's run: its exit status, and what each of its workers (by local rank) wrote."""

    def __init__(self, returncode: int, log_dir: Path, launcher_stderr: str):
        self.returncode, self.launcher_stderr = returncode, launcher_stderr
        self.workers = {}
        for folder in sorted(log_dir.glob("*/attempt_0/*")):
            self.workers[int(folder.name)] = tuple((folder / f"{stream}.log").read_text(errors="replace")
                                                   for stream in ("stdout", "stderr"))

    def stdout(self, local_rank: int = 0) -> str:
        return self.workers[local_rank][0]

    def stderr(self, local_rank: int = 0) -> str:
        return self.workers[local_rank][1]

    def text(self) -> str:
        return (f"exit status {self.returncode}\n" + "".join(f"[local rank {rank} stdout]\n{out[-2000:]}\n"
                f"[local rank {rank} stderr]\n{err[-3000:]}\n" for rank, (out, err) in self.workers.items())
                + f"[launcher]\n{self.launcher_stderr[-1500:]}")


class Launch:
    """The nodes of one run, started together; torchrun writes each worker's output to files of its
    own (--log_dir, --redirects), so that a worker's output is told apart from the launcher's."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.started = folder, {}, time.monotonic()
        folder.mkdir()

    def log_dir(self, name: str) -> Path:
        return self.folder / name

    def start(self, name: str, command: list[str], **env) -> None:
        with open(self.folder / f"{name}.launcher", "w") as launcher_output:
            self.procs[name] = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(**env), stdout=launcher_output,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = TIMEOUT) -> dict[str, Node]:
        """{name: Node} once every node has ended; all are killed after `timeout` seconds."""
        deadline = self.started + timeout
        try:
            for proc in self.procs.values():
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out after {timeout} s:\n" + self.text(self.nodes())) from None
        self.seconds = time.monotonic() - self.started
        return self.nodes()

    def nodes(self) -> dict[str, Node]:
        return {name: Node(proc.returncode, self.log_dir(name), (self.folder / f"{name}.launcher").read_text())
                for name, proc in self.procs.items()}

    @staticmethod
    def text(nodes: dict[str, Node]) -> str:
        return "\n".join(f"===== {name}: {node.text()}" for name, node in nodes.items())

    def kill(self, name: str | None = None) -> None:
        """SIGKILL a node's launcher and its workers (all nodes without a name): torchrun starts its
        workers in sessions of their own, so the whole process tree is walked."""
        import psutil

        for proc in [self.procs[name]] if name else self.procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                for process in [*parent.children(recursive=True), parent]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            proc.wait()


def node_command(launch: Launch, name: str, node_rank: int, port: int, arguments: list[str], nnodes: int = 2,
                 nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
            "--log_dir", str(launch.log_dir(name)), "--redirects", "3", *arguments]  # fmt: skip


def on_own_disk(command: list[str], disk: Path, folder: Path) -> list[str]:
    """`command` in a mount namespace of its own where `disk` is mounted over `folder`: it sees and
    writes only `disk` there, and nobody outside sees what it writes (bar the test, through `disk`)."""
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "own-disk",
            str(disk), str(folder), *command]  # fmt: skip


def two_nodes(tmp_path: Path, name: str, arguments: list[str], out: Path, node1_disk: Path | None = None,
              env0: dict | None = None, env1: dict | None = None) -> Launch:
    """Start node 0 and node 1 of one run; with `node1_disk`, node 1 has its own disk at `out`."""
    launch = Launch(tmp_path / name)
    port = free_port()
    launch.start("node0", node_command(launch, "node0", 0, port, arguments), **(env0 or {}))
    command = node_command(launch, "node1", 1, port, arguments)
    if node1_disk is not None:
        node1_disk.mkdir(exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)  # the mount point
        command = on_own_disk(command, node1_disk, out)
    launch.start("node1", command, **(env1 or {}))
    return launch


def one_node_of_two(tmp_path: Path, name: str, arguments: list[str]) -> Launch:
    launch = Launch(tmp_path / name)
    launch.start("node0", node_command(launch, "node0", 0, free_port(), arguments, nnodes=1, nproc=2))
    return launch


def assert_finished(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        assert node.returncode == 0, Launch.text(nodes)
        assert not any("Traceback" in err for _, err in node.workers.values()), Launch.text(nodes)


# ---------------------------------------------------------------- the reference: one node, two processes


@pytest.fixture(scope="module")
def reference(tiny_model_dir, samples, tmp_path_factory):
    """One node of two processes: its losses by step, and its output folder."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    launch = one_node_of_two(tmp, "run", train_arguments(tiny_model_dir, samples, out))
    nodes = launch.wait()
    assert_finished(nodes)
    found = losses(nodes["node0"].stdout())
    assert sorted(found) == [1, 2, 3, 4]
    print(f"one node of two processes: {launch.seconds:.1f} s")
    return found, out


# ---------------------------------------------------------------- a shared output folder


def test_two_nodes_with_a_shared_folder_equal_one_node_of_two_processes_and_resume_exactly(
        reference, tiny_model_dir, samples, tmp_path):
    expected, _ = reference
    out = tmp_path / "out"
    arguments = train_arguments(tiny_model_dir, samples, out)
    launch = two_nodes(tmp_path, "run", arguments, out)
    nodes = launch.wait()
    assert_finished(nodes)
    print(f"two nodes, shared folder: {launch.seconds:.1f} s")
    assert "world size 2" in nodes["node0"].stdout()
    assert losses(nodes["node0"].stdout()) == expected  # to every printed digit
    for step in (2, 4):
        for rank in (0, 1):
            assert (out / f"epoch-1-step-{step}" / f"optimizer-rank{rank}.safetensors").is_file()

    # resume on two nodes from step 2: steps 3 and 4 again, to the same losses
    launch = two_nodes(tmp_path, "resume", arguments + ["--resume_from_checkpoint", str(out / "epoch-1-step-2")], out)
    nodes = launch.wait()
    assert_finished(nodes)
    print(f"two nodes, shared folder, resume: {launch.seconds:.1f} s")
    assert losses(nodes["node0"].stdout()) == {step: expected[step] for step in (3, 4)}


# ---------------------------------------------------------------- no shared folder


def one_error_line(stderr: str) -> str:
    """The worker's only line on stderr, an `error:` line (progress bars aside); no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


@needs_unshare
def test_two_nodes_without_a_shared_folder_stop_at_start_up_in_one_line(tiny_model_dir, samples, tmp_path):
    """Before the fix both nodes trained until the first checkpoint, then rank 1 died with a
    safetensors traceback (No such file or directory: .../.tmp-epoch-1-step-2/...)."""
    out = tmp_path / "out"
    launch = two_nodes(tmp_path, "run", train_arguments(tiny_model_dir, samples, out), out,
                       node1_disk=tmp_path / "node1-disk")
    nodes = launch.wait()
    print(f"two nodes, no shared folder, refused: {launch.seconds:.1f} s")
    lines = set()
    for node in nodes.values():
        assert node.returncode != 0
        lines.add(one_error_line(node.stderr()))
        assert "trainable params" not in node.stdout()  # before the model loads
    line, = lines  # every rank says the same
    assert "is not one folder that every node shares" in line and "node 1" in line and "rank 1" in line
    assert "--save_on_each_node" in line
    for disk in (out, tmp_path / "node1-disk"):  # nothing written but the tokens, and they are gone
        assert sorted(p.name for p in disk.iterdir()) == []


def partitions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("optimizer-rank*.safetensors"))


@needs_unshare
def test_each_node_keeps_its_own_copy_survives_a_killed_node_resumes_exactly_and_merges(
        reference, tiny_model_dir, samples, tmp_path):
    """--save_on_each_node: each node writes a full copy of each checkpoint on its own disk, with
    its own ranks' partitions. Node 1 is killed while it writes step 4's copy, after node 0 has
    renamed its own into place: step 2 stays complete on both, `latest` on both resumes from it (the
    newest complete on every node), the losses are the reference's, and node 0's copy merges."""
    from utils.training.manifest import checkpoint_problem

    expected, _ = reference
    out, disk1 = tmp_path / "out", tmp_path / "node1-disk"
    arguments = train_arguments(tiny_model_dir, samples, out, "--save_on_each_node", "--save_total_limit", "1")
    launch = two_nodes(tmp_path, "run", arguments, out, node1_disk=disk1, env1={"ROLEPLAY_STALL_AT": "save:2"})
    stalled = launch.log_dir("node1")
    deadline = time.monotonic() + TIMEOUT
    while not any("stalled at save" in p.read_text() for p in stalled.glob("*/attempt_0/0/stdout.log")):
        assert time.monotonic() < deadline and launch.procs["node1"].poll() is None, Launch.text(launch.nodes())
        time.sleep(0.1)
    launch.kill("node1")
    nodes = launch.wait()
    print(f"two nodes, each its own copy, node 1 killed at step 4: {launch.seconds:.1f} s")
    assert nodes["node0"].returncode != 0  # its partner is gone
    assert losses(nodes["node0"].stdout()) == {step: expected[step] for step in (1, 2, 3, 4)}
    assert checkpoint_problem(str(out / "epoch-1-step-4")) is None  # node 0 had finished its copy
    assert not (disk1 / "epoch-1-step-4").exists() and list(disk1.glob(".tmp-epoch-1-step-4.*"))
    for disk, rank in ((out, 0), (disk1, 1)):
        assert checkpoint_problem(str(disk / "epoch-1-step-2"), [rank]) is None
        assert partitions(disk / "epoch-1-step-2") == [f"optimizer-rank{rank}.safetensors"]  # its own ranks'

    launch = two_nodes(tmp_path, "resume", arguments + ["--resume_from_checkpoint", "latest"], out, node1_disk=disk1)
    nodes = launch.wait()
    assert_finished(nodes)
    print(f"two nodes, each its own copy, resume: {launch.seconds:.1f} s")
    assert "epoch-1-step-4 is not complete on every node; resuming from epoch-1-step-2" in nodes["node0"].stdout()
    assert losses(nodes["node0"].stdout()) == {step: expected[step] for step in (3, 4)}
    for disk, rank in ((out, 0), (disk1, 1)):
        # the same checkpoints on every node: the newest (the best too), step 2 deleted by the limit
        assert sorted(p.name for p in disk.glob("epoch-*")) == ["epoch-1-step-4"]
        assert os.readlink(disk / "best") == "epoch-1-step-4"
        assert checkpoint_problem(str(disk / "epoch-1-step-4"), [rank]) is None
        assert not list(disk.glob(".tmp-*")), list(disk.iterdir())  # the killed node's half-written copy is gone
    assert (disk1 / "epoch-1-step-4" / "adapter_model.safetensors").read_bytes() == \
        (out / "epoch-1-step-4" / "adapter_model.safetensors").read_bytes()

    merged = tmp_path / "merged"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "merge_params.py", "--ori_model_dir", str(tiny_model_dir),
                           "--model_dir", str(out / "epoch-1-step-4"), "--save_model_dir", str(merged)],
                          cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)  # fmt: skip
    print(f"merge of node 0's copy: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))


def test_a_partition_missing_on_resume_is_one_line_naming_the_rank_and_the_node(reference, tmp_path, monkeypatch):
    """The check that every rank makes of the checkpoint it resumes from, on its own disk, here in
    a process group of one (rank 0, as node 1 of a torchrun launch) over a copy of the reference's."""
    import shutil

    import torch.distributed as dist

    from utils.cli import UserError
    from utils.training.storage import Storage

    out = tmp_path / "out"
    shutil.copytree(reference[1] / "epoch-1-step-4", out / "epoch-1-step-4")
    (out / "epoch-1-step-4" / "optimizer-rank0.safetensors").unlink()
    monkeypatch.setenv("GROUP_RANK", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        storage = Storage(str(out), 0, [0], False, "test")
        with pytest.raises(UserError) as raised:
            storage.checkpoint_to_resume(str(out / "epoch-1-step-4"))
        assert f"epoch-1-step-4 on node 1 ({socket.gethostname()}), rank 0: optimizer-rank0.safetensors is " \
               "missing" in str(raised.value)
        with pytest.raises(UserError, match="no checkpoint in .* is complete on every node"):
            storage.checkpoint_to_resume("latest")
    finally:
        dist.destroy_process_group()

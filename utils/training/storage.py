"""Where a run's checkpoints live, checked at start-up by every rank, before the model loads.

Every node's first process (and rank 0) writes a token into --output_dir, and every rank looks
for the tokens by name (a lookup by name reaches an NFS server; a directory listing may be
cached). The ranks that see a token share that process's disk; each group of them writes one
copy of every checkpoint, by its lowest rank (the group's writer):

  - One folder that every rank sees (NFS, Lustre, one machine): one group, rank 0 writes.
  - Each node its own disk, with --save_on_each_node: each node writes a full copy of every
    checkpoint on its own disk, as the HF Trainer's save_on_each_node does: the node's ranks
    write their optimizer partitions into a temporary folder its first process made there, and
    that process writes the adapter, tokenizer, arguments, prompt record and trainer state (the
    same on every rank) and the manifest, and renames the folder into place. A resume on any
    node then reads everything from its own disk, and merge_params.py needs one node's copy.
  - Each node its own disk without --save_on_each_node: every rank stops at once, in one line.

The writer of each copy also locks it (utils.lock) for the life of the run, and removes what an
earlier run left half-written there.
"""

import os
import secrets
import shutil
import socket
import sys

import torch.distributed as dist

from utils.cli import UserError
from utils.files import TMP_PREFIX
from utils.lock import LOCK_FILE, OutputLock
from utils.training.manifest import checkpoint_problem, damaged_note, scan_checkpoints

TOKEN_PREFIX = TMP_PREFIX + "storage-check-"
# what an earlier run leaves behind when it is killed: checkpoints being written or deleted, a link
LEFTOVERS = (TMP_PREFIX + "epoch-", TMP_PREFIX + "deleting-", TMP_PREFIX + "best")


def several_nodes() -> bool:
    """Whether the launcher started this run's processes on more than one machine (before the
    process group starts: from the launchers' variables)."""
    world = os.environ.get("WORLD_SIZE", "1")
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world
    return world.isdigit() and local.isdigit() and int(world) > int(local)


def node_of_this_process() -> str:
    """How this process's machine is named in messages: its node rank where the launcher set one
    (torchrun, deepspeed, SLURM), and its host."""
    for variable in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID", "NODE_RANK"):
        if os.environ.get(variable, "").isdigit():
            return f"node {os.environ[variable]} ({socket.gethostname()})"
    return f"host {socket.gethostname()}"


def agree(problem: str | None) -> None:
    """Every rank raises the first rank's problem, if any rank has one (a collective call: every
    rank makes it), so that no rank is left waiting for one that stopped."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise UserError(first)


class Storage:
    """The copies of a run's checkpoints: `writer` is the rank that writes this rank's copy, `ranks`
    the ranks whose partitions that copy holds, `nonce` the run's mark on its temporary names."""

    def __init__(self, output_dir: str, writer: int, ranks: list[int], shared: bool, nonce: str):
        self.output_dir, self.writer, self.ranks, self.shared, self.nonce = output_dir, writer, ranks, shared, nonce
        self.node = node_of_this_process()
        self.lock = None

    @property
    def is_writer(self) -> bool:
        return dist.get_rank() == self.writer

    def temporary(self, name: str) -> str:
        """The temporary name of checkpoint `name`: this run's own, so that no other process's
        clean-up or save can touch it."""
        return os.path.join(self.output_dir, f"{TMP_PREFIX}{name}.{self.nonce}")

    @classmethod
    def one_folder(cls, output_dir: str) -> "Storage":
        """Every rank shares `output_dir` and rank 0 writes (tests/engine_checks.py, the GPU bench)."""
        nonce = [secrets.token_hex(4)]
        dist.broadcast_object_list(nonce, src=0)
        return cls(output_dir, 0, list(range(dist.get_world_size())), True, nonce[0])

    @classmethod
    def check(cls, output_dir: str, save_on_each_node: bool, log=print, folder_problems=None) -> "Storage":
        """Find out which ranks share which copy of `output_dir`, stop every rank at once where the
        ranks do not share one and `save_on_each_node` is off, then lock each copy and clear it of
        an earlier run's leftovers. `folder_problems()`: the problems with what this rank sees in
        the folder, once it is locked, which stop every rank. Collective: every rank calls it, after
        the process group starts."""
        rank, world_size = dist.get_rank(), dist.get_world_size()
        nonce = [secrets.token_hex(4)]
        dist.broadcast_object_list(nonce, src=0)
        token = lambda r: os.path.join(output_dir, f"{TOKEN_PREFIX}{nonce[0]}-rank{r}")
        leader = rank == 0 or os.environ.get("LOCAL_RANK", "0") == "0"
        problem = None
        try:
            os.makedirs(output_dir, exist_ok=True)
            if leader:
                with open(token(rank), "w") as f:
                    f.write(node_of_this_process() + "\n")
        except OSError as error:
            problem = f"--output_dir: cannot write into {output_dir!r} on {node_of_this_process()} ({error.strerror})"
        leaders = [None] * world_size
        dist.all_gather_object(leaders, (leader, problem))  # every token is written once this returns
        agree(next((p for _, p in leaders if p), None))
        seen = [r for r, (is_leader, _) in enumerate(leaders) if is_leader and os.path.exists(token(r))]
        views = [None] * world_size
        dist.all_gather_object(views, (seen, node_of_this_process()))  # every rank has looked once this returns
        if leader:
            os.remove(token(rank))
        blind = [r for r, (ranks_seen, _) in enumerate(views) if 0 not in ranks_seen]
        if blind and not save_on_each_node:
            nodes = sorted({views[r][1] for r in blind})
            raise UserError(
                f"--output_dir {output_dir!r} is not one folder that every node shares: {', '.join(nodes)} "
                f"({'rank' if len(blind) == 1 else 'ranks'} {', '.join(map(str, blind))}) "
                "cannot see what rank 0 writes there; put it on a filesystem every node mounts (NFS, Lustre), "
                "or pass --save_on_each_node to keep a full copy of each checkpoint on every node's own disk")
        if any(not ranks_seen for ranks_seen, _ in views):
            raise UserError(f"--output_dir: rank {next(r for r, (s, _) in enumerate(views) if not s)} sees no "
                            "other process's token there, not even its own node's; is LOCAL_RANK set by the launcher?")
        writer = min(views[rank][0])
        storage = cls(output_dir, writer, [r for r, (s, _) in enumerate(views) if min(s) == writer], not blind,
                      nonce[0])
        if save_on_each_node and not blind and rank == 0:
            log("--save_on_each_node: every node sees the same --output_dir, so one copy is written, by rank 0")
        problem = None
        if storage.is_writer:
            try:
                storage.lock = OutputLock(os.path.join(output_dir, LOCK_FILE), f"--output_dir {output_dir!r}",
                                          "train.py").acquire()
                storage.remove_leftovers(log)
            except UserError as error:
                problem = f"{error} ({storage.node})" if not storage.shared else str(error)
        agree(problem)
        if folder_problems:  # once every copy is locked and cleared
            problem = next(iter(folder_problems()), None)
            agree(f"{problem} (on {storage.node})" if problem and not storage.shared else problem)
        return storage

    def remove_leftovers(self, log) -> None:
        """Remove what a killed run left under temporary names (only its writer, holding the lock, may)."""
        left = sorted(n for n in os.listdir(self.output_dir) if n.startswith(LEFTOVERS))
        for name in left:
            path = os.path.join(self.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        if left and dist.get_rank() == 0:
            log(f"removed what an earlier run left half-written in {self.output_dir}: {', '.join(left)}")

    def checkpoint_to_resume(self, wanted: str | None, log=print) -> str | None:
        """The checkpoint to resume from, the same on every rank, checked on every rank's own disk:
        `wanted`, or with "latest" the newest that is complete on every copy. Damaged ones are
        skipped with a note naming them; a named one that is damaged, or that lacks a rank's
        optimizer partition on that rank's node, is one line naming the rank and the node."""
        if not wanted:
            return None
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if wanted == "latest":
            complete, damaged = scan_checkpoints(self.output_dir)
            if damaged and self.is_writer:
                print(damaged_note(damaged, self.output_dir), file=sys.stderr, flush=True)
            # {name: why this rank cannot resume from it, or None}
            mine = {os.path.basename(path): checkpoint_problem(path, [rank]) for path in complete}
            everywhere = [None] * world_size
            dist.all_gather_object(everywhere, (mine, self.node))
            common = [name for name in everywhere[0][0]
                      if all(name in theirs and not theirs[name] for theirs, _ in everywhere)]  # fmt: skip
            if not common:
                why = next((f" ({name} on {node}, rank {r}: {theirs[name]})" for r, (theirs, node) in enumerate(everywhere)
                            for name in reversed(list(theirs)) if theirs[name]), "")  # fmt: skip
                raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {self.output_dir!r} is complete "
                                f"on every node{why}" if not self.shared else
                                f"--resume_from_checkpoint latest: no complete checkpoint in {self.output_dir!r}{why}")
            newest = list(everywhere[0][0])[-1]
            if common[-1] != newest and rank == 0:
                log(f"note: {newest} is not complete on every node; resuming from {common[-1]}, the newest that is")
            return os.path.join(self.output_dir, common[-1])
        problem = checkpoint_problem(wanted, [rank])
        if problem:
            problem = f"--resume_from_checkpoint: {wanted} on {self.node}, rank {rank}: {problem}"
        agree(problem)
        return wanted

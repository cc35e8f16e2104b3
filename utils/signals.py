"""Clean stops of a training run: SIGINT (Ctrl-C) and SIGTERM (what spot machines and cluster
schedulers send before they kill a job) ask train.py to stop after the current optimizer step and
save; a second Ctrl-C stops at once. Also the stall points the crash-safety tests stop a run at.

The signals are taken by a thread with sigwaitinfo, not by a Python handler, because the sender
matters: under torchrun a Ctrl-C reaches every worker twice, from the terminal and again from the
launcher, which forwards it (the deepspeed launcher forwards it as SIGTERM), and only a second
press by the user may stop at once. sigwaitinfo needs the signals blocked in every thread, so
`STOP.install()` must run before torch starts its threads. No torch import here, for that reason.
"""

import os
import signal
import sys
import threading

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _say(text: str) -> None:
    # rank 0 only; os.write because this runs beside the main thread's own printing
    if os.environ.get("RANK", "0") == "0":
        os.write(sys.stderr.fileno(), (text + "\n").encode())


class StopSignals:
    """What the run has been asked. Before `armed` is set (set-up) and after it is cleared, a
    signal ends the process at once, as it would by default; while armed, the first one sets
    `first` and the loop stops at its next step boundary."""

    def __init__(self):
        self.first = None
        self.armed = False
        self._received = 0
        self._changed = threading.Condition()
        self._launched = False

    def install(self) -> "StopSignals":
        # a launcher sets RANK before the process starts; a bare `python train.py` gets it later
        self._launched = "RANK" in os.environ
        signal.pthread_sigmask(signal.SIG_BLOCK, set(NAMES))
        threading.Thread(target=self._take_signals, name="stop-signals", daemon=True).start()
        return self

    def _take_signals(self) -> None:
        while True:
            info = signal.sigwaitinfo(set(NAMES))
            self.receive(info.si_signo, info.si_pid)

    def receive(self, signum: int, sender: int) -> None:
        with self._changed:
            if not self.armed:
                _say("interrupted" if signum == signal.SIGINT else "terminated")
                os._exit(128 + signum)
            forwarded = self._launched and sender == os.getppid()
            if self.first is None:
                self.first = signum
                _say(f"{NAMES[signum]}: stopping after this optimizer step to save a checkpoint "
                     "(Ctrl-C again to stop at once, without it)")
            elif signum == signal.SIGINT and not forwarded:
                _say("stopped at once, without saving; --resume_from_checkpoint latest resumes from the newest "
                     "complete checkpoint")
                os._exit(128 + signal.SIGINT)
            self._received += 1
            self._changed.notify_all()

    def received(self) -> int:
        """How many signals have arrived while armed."""
        return self._received

    def wait_for_signal(self, seen: int, timeout: float) -> None:
        """Return when more than `seen` signals have arrived (or after `timeout` seconds)."""
        with self._changed:
            self._changed.wait_for(lambda: self._received > seen, timeout)


STOP = StopSignals()


def stall_point(name: str) -> None:
    """Crash-safety tests stop the run here, then kill or signal it.

    ROLEPLAY_STALL_AT=NAME[:N][,NAME[:N]...] parks the process the Nth time (default 1st) it
    reaches the point NAME ("step": after a micro-batch's backward, "eval" or "save"), after
    printing `stalled at NAME`, until a signal arrives (or for an hour).
    """
    wanted = os.environ.get("ROLEPLAY_STALL_AT")
    if not wanted:
        return
    stall_point.seen[name] = stall_point.seen.get(name, 0) + 1
    for point in wanted.split(","):
        point_name, _, nth = point.partition(":")
        if point_name == name and stall_point.seen[name] == int(nth or 1):
            seen = STOP.received()  # before the line that tells the test to send the signal
            sys.stdout.write(f"stalled at {name}\n")  # one write: the line of another rank cannot split it
            sys.stdout.flush()
            STOP.wait_for_signal(seen, timeout=3600)


stall_point.seen = {}

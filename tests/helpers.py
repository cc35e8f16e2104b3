"""Helpers that several test files share: waiting for an event, checking a one-line error, a model
that records and can hold its generate() calls, serving an app on a free loopback port for the
length of a block, the check that packed rows train exactly as their samples alone, and a
character card PNG."""

import base64
import contextlib
import json
import re
import threading
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def wait_for(condition, timeout=30.0, what="condition"):
    """Poll `condition` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_one_line_error(proc, *needles):
    """stderr holds one `error:` line and nothing else but progress bars (loading weights)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if not re.search(r"\d+%\|", line)]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


class _Sleep(StoppingCriteria):
    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, input_ids, scores, **kwargs):
        time.sleep(self.seconds)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class RecordingModel:
    """The real tiny model behind a thin wrapper: every generate() call's kwargs and output are
    recorded, `running` says whether one is under way, `gate` can hold generation back (to fill
    the bound) and `delay` slows each new token (to watch a reply stream). Everything else is
    the model's own."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict] = []
        self.outputs: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self._running = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._running > 0

    def generate(self, **kwargs):
        with self._lock:
            self._running += 1
            self.calls.append(kwargs)
        try:
            if not self.gate.wait(60):
                raise TimeoutError("the test never opened the gate")
            if self.delay:
                slow = _Sleep(self.delay)
                kwargs = {**kwargs, "stopping_criteria": StoppingCriteriaList([*kwargs.get("stopping_criteria", []),
                                                                               slow])}
            output = self.model.generate(**kwargs)
            self.outputs.append(output)
            return output
        finally:
            with self._lock:
                self._running -= 1

    def __getattr__(self, name):
        return getattr(self.model, name)


@contextlib.contextmanager
def serve(app):
    """Serve a FastAPI app (web_demo.build_app) on a free 127.0.0.1 port; yields its URL."""
    import web_demo

    sock = web_demo.listen("127.0.0.1", 0)
    server = web_demo.make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=60, what="the server to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def card_png(path, card: dict):
    """A character card as a PNG written by Pillow, the card's JSON in base64 in a `chara` tEXt chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card, ensure_ascii=False).encode()).decode())
    Image.new("RGB", (8, 8), (200, 60, 60)).save(path, pnginfo=info)
    return path


def assert_packing_is_exact(model, examples: list[dict], packed: list[dict], pad_id: int) -> None:
    """The packed rows give the loss and gradients of the same samples in a plain padded batch."""
    from utils.data import collate

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(collate(examples, pad_id))
    packed_loss, packed_grads = loss_and_grads(collate(packed, pad_id))
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)


class CountingSlots:
    """utils.chat.GenerationSlots that also count the requests holding a place (generating or
    waiting) in `inside`, for a test to wait until the bound is as full as it means it to be."""

    def __init__(self, running: int, waiting: int):
        from utils.chat import GenerationSlots

        self.slots = GenerationSlots(running, waiting)
        self.inside = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def place(self):
        counted = False
        try:
            with self.slots.place() as turn:  # Busy: never counted
                with self._lock:
                    self.inside, counted = self.inside + 1, True
                yield turn
        finally:  # once the real place is given back
            if counted:
                with self._lock:
                    self.inside -= 1

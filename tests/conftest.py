"""Shared fixtures: a tiny Baichuan2 checkpoint and the real Baichuan2 tokenizer.

    tiny_tokenizer_model  bytes of a small sentencepiece BPE model trained on data/sample
    tiny_model_dir        a saved tiny checkpoint (rope, 64 wide, 2 layers) with that tokenizer
    loaded                (model, tokenizer) of it on the CPU, for the chat front ends (module-scoped)
    roles                 the roles of data/roles.json with their system prompts
    real_tokenizer_path   ../shared/baichuan2/tokenizer.model, or the test is skipped
    browser               the Debian Chromium under Playwright, headless and off the network (module-scoped)

Everything else is session-scoped and built in well under a second; treat the outputs as read-only
(copy `tiny_model_dir` before changing files in it).
"""

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
# The real tokenizer files; read them in place, never copy them into the repository.
SHARED = REPO_ROOT.parent / "shared" / "baichuan2"
REAL_TOKENIZER = SHARED / "tokenizer.model"
HAVE_REAL_TOKENIZER = REAL_TOKENIZER.is_file()
requires_real_tokenizer = pytest.mark.skipif(not HAVE_REAL_TOKENIZER, reason=f"{REAL_TOKENIZER} is missing")

TINY_VOCAB_SIZE = 1200
CHROMIUM = "/usr/bin/chromium"
# headless, and nothing fetched behind the test's back: a test that counts requests sees only its own
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def normal_file_mode() -> int:
    """The mode a file created with the process's umask gets (0o644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def assert_normal_permissions(directory) -> None:
    """Every file under `directory` has the umask's normal mode (no 0600 left from a temp file)."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == normal_file_mode(), (path, oct(path.stat().st_mode & 0o777))


def sample_texts() -> list[str]:
    """Questions and replies of the sample data, one text each, in file order."""
    texts = []
    for path in sorted(SAMPLE_DIR.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    texts.append(row["question"])
                    texts.extend(row["generated"])
    return texts


# The files that hold the suite's longest runs (trainings under launchers, the quickstart), longest
# first. Under scripts/test.sh the two workers take them before anything else, so that none starts
# late and keeps one worker busy for a minute after the other has run out of tests.
LONG_FILES = ("test_train.py", "test_bad_inputs.py", "test_preference.py", "test_multinode.py", "test_quickstart.py",
              "test_hardening_training.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """For `--dist loadgroup` (scripts/test.sh). A file's tests that share a module-scoped fixture (a
    training run, a server, a browser) are one group, which one worker runs: split across the
    workers, as worksteal split them, each worker built the fixture again (test_train.py's training
    runs up to three times in a run). pytest gives a test's fixtures with their scopes only in
    `_fixtureinfo`. The workers take the long files first, then the other groups, then the tests of
    no group one at a time, which even out the end."""
    grouped = set()
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
            grouped.add(item)
    if config.getoption("dist", "no") == "loadgroup":
        rank = {name: i for i, name in enumerate(LONG_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES) + (item not in grouped)))


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory) -> bytes:
    from baichuan.tiny import train_sentencepiece

    corpus = tmp_path_factory.mktemp("corpus") / "sample.txt"
    corpus.write_text("\n".join(sample_texts()) + "\n", encoding="utf-8")
    return train_sentencepiece(str(corpus), TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_model) -> Path:
    from baichuan.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny(str(out), tiny_tokenizer_model)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from utils.models import load_for_inference

    return load_for_inference(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def roles():
    from utils.prompts import roles_from_file

    return roles_from_file(str(REPO_ROOT / "data" / "roles.json"))


@pytest.fixture(scope="session")
def real_tokenizer_path() -> Path:
    if not HAVE_REAL_TOKENIZER:
        pytest.skip(f"{REAL_TOKENIZER} is missing")
    return REAL_TOKENIZER


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

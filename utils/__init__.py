"""Code the scripts share, one module per concern (no script imports another script):

    utils.prompts    the prompt contract: system template, roles, and the record every checkpoint carries
    utils.cards      character cards (SillyTavern / TavernAI, JSON or PNG) as roles and training dialogues
    utils.rolebench  reading RoleBench-format files (data_helper.py and evaluate.py)
    utils.data       training samples and conversations: reading, encoding, packing, batching
    utils.training   distributed set-up, the DeepSpeed config, checkpoints, evaluation, the memory estimate
    utils.signals    clean stops of a training run on SIGINT/SIGTERM, and the stall points of its tests
    utils.lock       a run's exclusive lock on its output (train.py, merge_params.py)
    utils.chat       the chat core of the front ends: loading a model, settings, streaming with a stop event

This module holds what every script needs and imports nothing heavy, so that `--help` stays instant:
the one error class, how a script reports bad arguments and exits, an atomic writer for files and
directories, a jsonl reader, and the silencing of third-party start-up noise.
"""

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


def exit_on_user_error(main, *args) -> None:
    """Run `main(*args)`: a UserError becomes `error: ...` on stderr and exit status 1; Ctrl-C exits
    with 130 and no traceback."""
    try:
        main(*args)
    except UserError as error:
        print(f"error: {' '.join(str(error).split(chr(10)))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's line breaks (its launch commands), marks the required flags and
    shows every default that is set."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return text + " (required)"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def exit_on_problems(problems: list[str]) -> None:
    """Report every argument problem at once, one `error:` line each, and exit 2 as argparse does."""
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def quiet_third_party() -> None:
    """Silence start-up notes that tell a user of these scripts nothing they can act on: DeepSpeed's
    "Setting accelerator to CPU" and its op-build chatter, bitsandbytes' missing optional CPU kernels,
    and PEFT's use of a renamed transformers property. Call it before those packages are imported."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not _has_cuda_device():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _has_cuda_device() -> bool:
    # /dev/nvidia0 exists on a machine with an NVIDIA GPU; asking torch would import it here
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


# ---------------------------------------------------------------- files


def _umask() -> int:
    # Read, not set and restored where Linux allows: the set-and-restore would give other threads
    # (Gradio's, a checkpoint saver's) a moment of umask 0.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_permissions(path: str) -> None:
    """Give a file (or every file and folder under a directory) the user's normal permissions.

    Temporary files come out 0600 (mkstemp, and transformers' own safetensors writer), and a
    rename keeps that: on a shared GPU server nobody else could read the model.
    """
    mask = _umask()
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def write_atomic(path: str, data: str | bytes) -> None:
    """Write text or bytes to `path` through a temporary file beside it, then rename it into place."""
    write_files({path: data})


def write_files(contents: dict[str, str | bytes]) -> None:
    """Write several files (path -> text or bytes) all or nothing: every temporary file is written
    first, and only then is each renamed into place."""
    temps = {}
    try:
        for path, data in contents.items():
            folder = os.path.dirname(os.path.abspath(path))
            fd, temps[path] = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            fix_permissions(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def jsonl_text(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_directory(final: str):
    """Yield a temporary directory beside `final`; when the block ends without an error it is
    given normal permissions and renamed to `final`, otherwise removed. A crash leaves only a
    `.tmp-` directory, never a half-written `final`."""
    final = os.path.abspath(final)
    tmp = os.path.join(os.path.dirname(final), TMP_PREFIX + os.path.basename(final))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        fix_permissions(tmp)
        # the old one is moved aside, not deleted, before the rename: a crash between the two
        # leaves a complete copy, which the next run's clean-up of `tmp` would not touch
        old = os.path.join(os.path.dirname(final), TMP_PREFIX + "old-" + os.path.basename(final))
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str, max_line_bytes: int | None = None, on_bad=None):
    """Yield (line number, parsed value) for each non-blank line of a UTF-8 jsonl file.

    A bad line (not UTF-8, not JSON, longer than `max_line_bytes`, a last line cut short) is a
    UserError naming the file and line, or, with `on_bad`, is handed to it as that message and
    skipped. A leading byte-order mark is allowed.
    """
    def bad(message):
        if on_bad is None:
            raise UserError(message)
        on_bad(message)

    if not os.path.isfile(path):
        raise UserError(f"{path}: is a directory" if os.path.isdir(path) else f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1 if max_line_bytes else -1), b""), 1):
                if max_line_bytes and len(raw) > max_line_bytes:
                    while raw and not raw.endswith(b"\n"):  # skip the rest of the huge line
                        raw = f.readline(max_line_bytes)
                    bad(f"{path}:{number}: line longer than {max_line_bytes:,} bytes, refused")
                    continue
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})")
                    continue
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as error:
                    if not text.endswith("\n"):
                        bad(f"{path}:{number}: truncated last line (not valid JSON, no newline at end of file)")
                    else:
                        bad(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})")
                    continue
                except RecursionError:
                    bad(f"{path}:{number}: JSON nested too deeply")
                    continue
                except ValueError as error:  # e.g. an integer past Python's 4,300-digit limit
                    bad(f"{path}:{number}: not valid JSON ({error})")
                    continue
                yield number, value
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None


def read_json(path: str, what: str = "file"):
    """A JSON file's value; a problem is a UserError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: {what} is a directory") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    except ValueError as error:  # e.g. an integer past Python's 4,300-digit limit
        raise UserError(f"{path}: not valid JSON ({error})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read {what} ({error.strerror})") from None

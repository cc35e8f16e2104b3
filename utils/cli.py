"""How a script meets its user: the one error class, reporting it (and bad arguments) as `error:`
lines with an exit status, the --help formatter, and the silencing of third-party start-up noise.
It imports nothing heavy, so that `--help` stays instant."""

import argparse
import logging
import os
import sys
import warnings


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


def exit_on_user_error(main, *args) -> None:
    """Run `main(*args)`: a UserError becomes `error: ...` on stderr and exit status 1; Ctrl-C exits
    with 130 and no traceback."""
    try:
        main(*args)
    except UserError as error:
        print(f"error: {printable(' '.join(str(error).split(chr(10))))}", file=sys.stderr)
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
            print(f"error: {printable(problem)}", file=sys.stderr)
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


# characters that let a name rewrite the terminal or the page it is shown on: controls (newline,
# carriage return, ESC, NUL, DEL, C1), format characters (the bidi overrides and isolates, U+200E/F,
# U+FEFF) and line or paragraph separators; the joiners U+200C/U+200D stay, names in Persian and
# emoji sequences need them
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
_JOINERS = ("\u200c", "\u200d")


def printable(text: str) -> str:
    """`text` with its unsafe characters (above) written as escapes (\\x1b, \\u202e), so that a name from
    a file cannot move the cursor, clear the terminal, forge a line or reorder what is shown around it."""
    import unicodedata

    return "".join(ascii(char)[1:-1] if unicodedata.category(char) in _UNSAFE_CATEGORIES and char not in _JOINERS
                   else char for char in text)


def unsafe_character(text: str) -> str | None:
    """The first control, bidi or other format character of `text`, described (`U+202E RIGHT-TO-LEFT
    OVERRIDE, a bidi or format character`), or None when it has none."""
    import unicodedata

    for char in text:
        category = unicodedata.category(char)
        if category in _UNSAFE_CATEGORIES and char not in _JOINERS:
            kind = "a control character" if category == "Cc" else "a bidi or format character"
            return f"U+{ord(char):04X} {unicodedata.name(char, '')}".rstrip() + f", {kind}"
    return None

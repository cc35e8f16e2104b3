"""Docs that cannot rot: every command in README.md and docs/*.md uses a script that exists and flags that its
parser has, every relative link and picture resolves, a `--help` excerpt quoted in the docs is what the parser
prints, and each script's launch examples (its docstring) are shown in the docs.

The flags are read from each script's real `--help` (the scripts import nothing heavy before parsing, so this
takes about a second per script), not from a list kept here."""

import ast
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPTS = ["data_helper.py", "train.py", "merge_params.py", "predict.py", "web_demo.py", "evaluate.py"]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# commands of other projects that the docs show (llama.cpp's converter); not ours to check
EXTERNAL_SCRIPTS = {"convert_hf_to_gguf.py"}
LAUNCHERS = {"python", "python3", "deepspeed", "torchrun"}
HELP_WIDTH = "80"  # argparse wraps --help to $COLUMNS; the quoted excerpts are wrapped at 80


# ---------------------------------------------------------------- reading the docs


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each ``` block."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_lines(text: str) -> list[str]:
    """The lines of the bash blocks, joined over `\\` breaks, and inline code that starts a command."""
    lines = []
    for language, body in fenced_blocks(text):
        if language in ("bash", "sh", "shell"):
            lines += body.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    lines += [code for code in re.findall(r"`([^`\n]+)`", prose) if re.match(r"^(python3?|bash) ", code)]
    return lines


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the docs' shell lines: comments dropped, split at && ; |."""
    commands = []
    for line in shell_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current = []
        for token in lexer:
            if token and set(token) <= set(";&|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [command for command in commands if command]


@functools.cache
def help_text(target: str) -> str:
    """`--help` of a script path, or of a module given as `-m name`."""
    args = target.split() if target.startswith("-m ") else [target]
    env = dict(os.environ, COLUMNS=HELP_WIDTH)
    proc = subprocess.run([sys.executable, *args, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, f"{target} --help failed: {proc.stderr[-1000:]}"
    return proc.stdout


def parser_flags(help_output: str) -> set[str]:
    """The option strings that --help lists: the `  -x, --name VALUE` lines, not flags named in the prose."""
    flags = set()
    for line in help_output.splitlines():
        match = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if match:
            flags.update(re.findall(r"(?:^|, )(--?[\w-]+)", match[1]))
    return flags


def command_problems(command: list[str]) -> list[str]:
    """What is wrong with one shell command of the docs: a script that does not exist, or a flag it lacks."""
    problems = []
    for i, token in enumerate(command):
        if token == "bash" and i + 1 < len(command):
            if not (REPO_ROOT / command[i + 1]).is_file():
                problems.append(f"bash {command[i + 1]}: no such script")
            return problems
        if token in LAUNCHERS:
            rest = command[i + 1:]
            break
    else:
        return problems
    if rest[:1] == ["-c"]:
        return problems
    if rest[:1] == ["-m"]:
        target, args = f"-m {rest[1]}", rest[2:]
    else:
        scripts = [j for j, arg in enumerate(rest) if arg.endswith(".py")]
        if not scripts:
            return problems
        target, args = rest[scripts[0]], rest[scripts[0] + 1:]
        if target in EXTERNAL_SCRIPTS:
            return problems
        if not (REPO_ROOT / target).is_file():
            return [f"{target}: no such script"]
    known = parser_flags(help_text(target))
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            if flag not in known:
                problems.append(f"{target}: {flag} is not one of its flags")
    return problems


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {github_anchor(m[1]) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def link_problems(path: Path) -> list[str]:
    """Relative links and pictures (markdown or <img>) whose file, or heading anchor, is not there."""
    text = path.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", prose)
    problems = []
    for target in targets:
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{path.name}: {target} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{path.name}: {target}: no heading with that anchor")
    return problems


def help_excerpts(text: str) -> list[tuple[str, list[str]]]:
    """Blocks that quote help: the first line `$ python X.py --help`, then lines of its output."""
    excerpts = []
    for _, body in fenced_blocks(text):
        lines = body.rstrip("\n").splitlines()
        match = re.match(r"^\$ python3? (\S+\.py) --help$", lines[0]) if lines else None
        if match:
            excerpts.append((match[1], lines[1:]))
    return excerpts


def contains_run(lines: list[str], excerpt: list[str]) -> bool:
    """The excerpt's lines appear together, in order, in the help."""
    lines = [line.rstrip() for line in lines]
    excerpt = [line.rstrip() for line in excerpt]
    return any(lines[i:i + len(excerpt)] == excerpt for i in range(len(lines) - len(excerpt) + 1))


def docstring_commands(script) -> list[str]:
    """The launch commands of a script's docstring, each joined over its `\\` line breaks."""
    doc = ast.get_docstring(ast.parse((REPO_ROOT / script).read_text(encoding="utf-8")))
    commands, current = [], ""
    for line in doc.splitlines():
        stripped = line.strip()
        if current or re.match(r"^(python|deepspeed|torchrun|CUDA_VISIBLE_DEVICES)", stripped):
            current += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                commands.append(" ".join(current.split()))
                current = ""
    return commands


# ---------------------------------------------------------------- the checks on the real docs


def test_the_docs_are_there():
    names = [path.name for path in DOCS]
    for page in ("training.md", "characters.md", "serving.md", "export.md", "evaluation.md", "design.md",
                 "security.md"):
        assert page in names
    assert sum(len(shell_commands(path.read_text(encoding="utf-8"))) for path in DOCS) > 40


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_every_command_uses_a_script_and_flags_that_exist(path):
    problems = [problem for command in shell_commands(path.read_text(encoding="utf-8"))
                for problem in command_problems(command)]
    assert problems == []


@pytest.mark.parametrize("path", [*DOCS, REPO_ROOT / "bench" / "README.md"], ids=lambda path: path.name)
def test_every_relative_link_and_picture_resolves(path):
    assert link_problems(path) == []


def test_quoted_help_matches_the_parser():
    excerpts = [excerpt for path in DOCS for excerpt in help_excerpts(path.read_text(encoding="utf-8"))]
    assert excerpts, "no --help excerpt is quoted in the docs"
    for script, lines in excerpts:
        assert contains_run(help_text(script).splitlines(), lines), f"{script} --help no longer prints:\n" + \
            "\n".join(lines)


def test_the_readme_is_short_and_opens_with_the_commands_and_the_picture():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:40])
    assert "bash scripts/quickstart.sh" in first_screen and "bash scripts/test.sh" in first_screen
    assert "![" in first_screen and "docs/img/chat.png" in first_screen


def test_pictures_are_small():
    pictures = sorted((REPO_ROOT / "docs" / "img").glob("*.png"))
    assert pictures
    assert [p.name for p in pictures if p.stat().st_size > 200 * 1024] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_launch_examples_are_in_the_docs(script):
    """Each script's own examples (its docstring, shown by --help) appear word for word in the docs."""
    docs = " ".join(" ".join(path.read_text(encoding="utf-8").replace("\\\n", " ") for path in DOCS).split())
    text = help_text(script)
    commands = docstring_commands(script)
    assert commands, f"{script} has no launch example"
    continued = [line for line in text.splitlines() if line.rstrip().endswith("\\")]
    assert len(continued) == text.count("\\\n"), "a continuation lost its line break"
    for command in commands:
        if "..." not in command:
            assert command in docs, f"{script}'s example is not in the docs: {command}"


# ---------------------------------------------------------------- the checks catch what they should


def test_a_flag_the_parser_lacks_is_caught():
    block = "```bash\npython train.py --model_name_or_path m --no_such_flag 3 \\\n    --lora_dim 16\n```\n"
    problems = [p for command in shell_commands(block) for p in command_problems(command)]
    assert problems == ["train.py: --no_such_flag is not one of its flags"]


def test_flags_named_in_help_prose_do_not_count_as_flags():
    """web_demo.py's help mentions --adapter in other flags' help; only its own option lines count."""
    assert "--lora_dim" not in parser_flags(help_text("web_demo.py"))
    assert {"--model_path", "--adapter", "--api_only", "-h", "--help"} <= parser_flags(help_text("web_demo.py"))


def test_env_prefixes_launchers_pipes_and_comments_are_parsed():
    block = ("```bash\nROLEPLAY_API_KEY=$(openssl rand -hex 16) python web_demo.py --model_path m --bogus  # --x\n"
             "deepspeed --num_gpus 2 train.py --also_bogus\nbash scripts/no_such.sh && python -m baichuan.tiny --nope\n"
             "python no_such_script.py\npython -c \"print('--fine')\"\n```\n")
    problems = [p for command in shell_commands(block) for p in command_problems(command)]
    assert problems == ["web_demo.py: --bogus is not one of its flags",
                        "train.py: --also_bogus is not one of its flags",
                        "bash scripts/no_such.sh: no such script",
                        "-m baichuan.tiny: --nope is not one of its flags",
                        "no_such_script.py: no such script"]


def test_inline_commands_in_prose_are_checked_too():
    problems = [p for command in shell_commands("Try `python predict.py --rol 李白 你好` or `tensorboard --x`.")
                for p in command_problems(command)]
    assert problems == ["predict.py: --rol is not one of its flags"]


def test_broken_links_and_anchors_are_caught(tmp_path):
    (tmp_path / "other.md").write_text("# A heading (`with code`)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [gone](missing.md) ![pic](img/none.png)\n"
                    "[bad anchor](other.md#nope) [web](https://example.com/x)\n", encoding="utf-8")
    assert link_problems(page) == ["page.md: missing.md does not exist", "page.md: img/none.png does not exist",
                                   "page.md: other.md#nope: no heading with that anchor"]


def test_a_stale_help_excerpt_is_caught():
    text = help_text("evaluate.py").splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("  --out_dir"))
    assert contains_run(text, text[start:start + 2])
    assert not contains_run(text, [text[start].replace("OUT_DIR", "OUT"), text[start + 1]])

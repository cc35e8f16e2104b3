"""Turn RoleBench-zh into instruction-tuning jsonl files for role-play fine-tuning.

Usage (from the repository root):

    # the small sample shipped with the repo (default paths)
    python data_helper.py

    # the real RoleBench-zh files, already downloaded into a folder
    python data_helper.py --data_dir ../shared/rolebench \
        --train_out data/train.jsonl --test_out data/test.jsonl

    # fetch the four files from the Hugging Face hub first (needs internet)
    python data_helper.py --download --data_dir data/rolebench

    # other roles, more replies per question, another seed
    python data_helper.py --data_dir data/rolebench --roles 皇帝,华妃 --max_replies 3 --seed 7

Input: --data_dir holds the four RoleBench-zh files under their RoleBench names
(see INPUT_FILES). For each split the general file and the role_specific file are
merged, in that order. --roles_file is a JSON object role name -> description
(RoleBench's profiles-zh_desc.json has that shape and works too).

Processing, per split:
  * rows whose role is not among --roles are skipped (they are still validated);
  * the leading "<role>，" that addresses the role is removed from the question;
    nothing else is touched, other full-width commas stay;
  * each split gets its own random.Random(seed); questions are visited in file order
    and, for a question with more than --max_replies replies, rng.sample picks that
    many (kept in their original order); every kept reply becomes one sample.

Output rows: {"instruction": system prompt, "input": question, "output": reply,
"role": role}. Both outputs are written atomically, and only after all input has
been read and validated. Counts per role and split are printed to stdout.

Errors: a bad argument prints "error: ..." lines (all of them) and exits 2; bad data
prints one line "error: path:line: what is wrong" and exits 1. With --skip_bad,
bad lines are skipped and counted instead.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import unicodedata

SYSTEM_TEMPLATE = (
    "你现在要扮演{role}。以下是{role}的人物设定：{description}\n"
    "请始终以{role}的身份、性格和口吻说话，不要跳出角色，"
    "也绝不要透露自己是人工智能、语言模型或助手。"
    "回答要简洁、口语化，像平常聊天一样随意自然。"
)

DEFAULT_ROLES = ["孙悟空", "张飞", "李白"]
SPLITS = ("train", "test")
KINDS = ("general", "role_specific")
# RoleBench file name in --data_dir -> path of the same file on the hub
INPUT_FILES = {
    (kind, split): f"rolebench-zh_{kind}_{split}.jsonl" for kind in KINDS for split in SPLITS
}
HUB_REPO_ID = "ZenMoore/RoleBench"
HUB_PATHS = {key: f"rolebench-zh/{key[0]}/{key[1]}.jsonl" for key in INPUT_FILES}
MAX_LINE_BYTES = 1_000_000
FULLWIDTH_COMMA = "，"


class DataError(Exception):
    """A problem with the input or output files; the message is one line."""


# ---------------------------------------------------------------- helpers for others

def load_roles(path):
    """Read a JSON object role name -> description. Raises DataError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            roles = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: roles file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: roles file is a directory") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read roles file ({e.strerror})") from None
    if not isinstance(roles, dict) or not roles:
        raise DataError(f"{path}: expected a non-empty JSON object of role name -> description")
    for name, description in roles.items():
        if not name.strip():
            raise DataError(f"{path}: empty role name")
        if not isinstance(description, str) or not description.strip():
            raise DataError(f"{path}: description of {name!r} must be a non-empty string")
    return roles


def build_system_prompt(role, description, template=SYSTEM_TEMPLATE):
    """The instruction given to the model for one persona."""
    return template.format(role=role, description=description.strip())


# ---------------------------------------------------------------- arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Build train/test jsonl files for role-play fine-tuning from RoleBench-zh.",
        epilog="Exit status: 0 ok, 1 bad data or download failure, 2 bad arguments.",
    )
    group = parser.add_argument_group("input")
    group.add_argument(
        "--data_dir", default="data/sample",
        help="folder with the four RoleBench-zh jsonl files under their RoleBench names "
             "(default: %(default)s)")
    group.add_argument(
        "--roles_file", default="data/roles.json",
        help="JSON object role name -> description, used for the system prompt; "
             "RoleBench's profiles-zh_desc.json also works (default: %(default)s)")
    group.add_argument(
        "--download", action="store_true",
        help=f"first fetch the files missing from --data_dir from the Hugging Face hub "
             f"dataset {HUB_REPO_ID}; existing files are never overwritten")

    group = parser.add_argument_group("output")
    group.add_argument("--train_out", default="data/train.jsonl",
                       help="train samples, jsonl (default: %(default)s)")
    group.add_argument("--test_out", default="data/test.jsonl",
                       help="test samples, jsonl (default: %(default)s)")
    group.add_argument(
        "--system_template", default=SYSTEM_TEMPLATE,
        help="system prompt template with {role} and {description} placeholders "
             "(default: the built-in Chinese SYSTEM_TEMPLATE)")

    group = parser.add_argument_group("selection")
    group.add_argument(
        "--roles", default=",".join(DEFAULT_ROLES),
        help="comma-separated roles to keep, each must be in --roles_file; rows of other "
             "roles are skipped (default: %(default)s)")
    group.add_argument(
        "--max_replies", type=int, default=2,
        help="keep at most this many replies per question, one sample each (default: %(default)s)")
    group.add_argument(
        "--seed", type=int, default=1234,
        help="seed for choosing which replies to keep (default: %(default)s)")

    group = parser.add_argument_group("robustness")
    group.add_argument(
        "--skip_bad", action="store_true",
        help="skip bad lines (with a warning each) and report how many, instead of stopping "
             "at the first one")
    return parser.parse_args(argv)


def split_roles(text):
    names = text.replace(FULLWIDTH_COMMA, ",").split(",")
    return list(dict.fromkeys(name.strip() for name in names if name.strip()))


def check_output_path(path, input_paths):
    """Return a problem with an output path, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{path}: output folder {folder} does not exist"
    if os.path.isdir(path):
        return f"{path}: output path is a directory"
    if os.path.exists(path) and any(
            os.path.exists(p) and os.path.samefile(path, p) for p in input_paths):
        return f"{path}: output would overwrite an input file"
    return None


def validate_args(args):
    """Check every argument; return (roles dict, selected role names, problems)."""
    problems = []
    roles = {}
    selected = split_roles(args.roles)
    if not selected:
        problems.append("--roles: no role given")
    try:
        roles = load_roles(args.roles_file)
    except DataError as e:
        problems.append(str(e))
    else:
        unknown = [name for name in selected if name not in roles]
        if unknown:
            problems.append(f"--roles: {', '.join(unknown)} not in {args.roles_file} "
                            f"(known: {', '.join(roles)})")
    if args.max_replies < 1:
        problems.append(f"--max_replies: must be at least 1, got {args.max_replies}")
    try:
        build_system_prompt("x", "y", args.system_template)
    except (KeyError, IndexError, ValueError) as e:
        problems.append(f"--system_template: not a valid template ({type(e).__name__}: {e})")
    else:
        for field in ("{role}", "{description}"):
            if field not in args.system_template:
                problems.append(f"--system_template: missing the {field} placeholder")

    input_paths = [os.path.join(args.data_dir, name) for name in INPUT_FILES.values()]
    if not args.download:
        if not os.path.isdir(args.data_dir):
            problems.append(f"{args.data_dir}: data folder not found")
        else:
            problems.extend(f"{p}: input file not found" for p in input_paths
                            if not os.path.isfile(p))
    for path in (args.train_out, args.test_out):
        problem = check_output_path(path, input_paths)
        if problem:
            problems.append(problem)
    if os.path.abspath(args.train_out) == os.path.abspath(args.test_out):
        problems.append(f"--train_out and --test_out are the same file: {args.train_out}")
    return roles, selected, problems


# ---------------------------------------------------------------- download

def download(data_dir):
    """Fetch the RoleBench-zh files missing from data_dir; never overwrite."""
    missing = {key: name for key, name in INPUT_FILES.items()
               if not os.path.isfile(os.path.join(data_dir, name))}
    if not missing:
        print(f"download: all four files already in {data_dir}, nothing fetched")
        return
    by_hand = (f"get them by hand from the dataset {HUB_REPO_ID} on huggingface.co and put "
               + ", ".join(f"{HUB_PATHS[k]} at {os.path.join(data_dir, name)}"
                           for k, name in missing.items()))
    tmp = None
    try:
        from huggingface_hub import hf_hub_download
        os.makedirs(data_dir, exist_ok=True)
        for key, name in missing.items():
            cached = hf_hub_download(repo_id=HUB_REPO_ID, filename=HUB_PATHS[key],
                                     repo_type="dataset")
            target = os.path.join(data_dir, name)
            tmp = target + ".part"
            shutil.copyfile(cached, tmp)
            os.replace(tmp, target)
            print(f"download: {HUB_PATHS[key]} -> {target}")
    except Exception as e:  # offline, no package, 404, disk: all end the same way
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        reason = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"could not download from the Hugging Face hub "
                        f"({type(e).__name__}: {reason}); {by_hand}") from None


# ---------------------------------------------------------------- reading

def read_lines(path):
    """Yield (line number, text, problem) for each non-blank line; text is None on a problem."""
    seen = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            text, problem = decode_line(f, raw, number)
            if text is not None and not text.strip():
                continue
            seen += 1
            yield number, text, problem
    if not seen:
        raise DataError(f"{path}: file is empty (no non-blank line)")


def decode_line(f, raw, number):
    """Return (text, None) or (None, problem) for one raw line read from f."""
    if len(raw) > MAX_LINE_BYTES:
        while raw and not raw.endswith(b"\n"):  # drop the rest of the huge line
            raw = f.readline(MAX_LINE_BYTES)
        return None, f"line longer than {MAX_LINE_BYTES:,} bytes, refused"
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
    if text.strip() and not text.endswith("\n"):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None, "truncated last line (not valid JSON, no newline at end of file)"
    return text, None


def parse_row(text):
    """Return the validated row as a dict, or raise ValueError with the problem."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for field in ("role", "question", "generated"):
        if field not in row:
            raise ValueError(f"missing field '{field}'")
    for field in ("role", "question"):
        if not isinstance(row[field], str):
            raise ValueError(f"field '{field}' must be a string, got {type(row[field]).__name__}")
    if not isinstance(row["generated"], list):
        raise ValueError(f"field 'generated' must be a list, got {type(row['generated']).__name__}")
    if not row["generated"]:
        raise ValueError("field 'generated' is an empty list")
    for i, reply in enumerate(row["generated"]):
        if not isinstance(reply, str) or not reply.strip():
            raise ValueError(f"generated[{i}] must be a non-empty string")
    kind = row.get("type")
    if kind is not None and not (isinstance(kind, str) or (
            isinstance(kind, list) and all(isinstance(k, str) for k in kind))):
        raise ValueError("field 'type' must be a string or a list of strings")
    question = strip_addressee(row["question"].strip(), row["role"])
    if not question:
        raise ValueError("question is empty")
    return {"role": row["role"], "question": question, "replies": row["generated"]}


def strip_addressee(question, role):
    """Remove only a leading "<role>，" (e.g. "张飞，"); keep every other comma."""
    prefix = role + FULLWIDTH_COMMA
    if question.startswith(prefix):
        return question[len(prefix):].strip()
    return question


def read_split(data_dir, split, selected, skip_bad, bad_lines):
    """Validated question rows of the selected roles for one split, in file order.

    Every row is validated; rows of roles not selected (even roles missing from the
    roles file, e.g. 皇帝 with a three-role roles file) are then simply skipped.
    """
    rows = []
    for kind in KINDS:
        path = os.path.join(data_dir, INPUT_FILES[(kind, split)])
        try:
            for number, text, problem in read_lines(path):
                if problem is None:
                    try:
                        row = parse_row(text)
                    except ValueError as e:
                        problem = str(e)
                if problem is not None:
                    message = f"{path}:{number}: {problem}"
                    if not skip_bad:
                        raise DataError(message)
                    print(f"warning: skipped {message}", file=sys.stderr)
                    bad_lines.append(message)
                elif row["role"] in selected:
                    rows.append(row)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return rows


# ---------------------------------------------------------------- processing

def make_samples(rows, roles, max_replies, seed, template):
    rng = random.Random(seed)
    samples = []
    for row in rows:
        replies = row["replies"]
        if len(replies) > max_replies:
            keep = sorted(rng.sample(range(len(replies)), max_replies))
            replies = [replies[i] for i in keep]
        instruction = build_system_prompt(row["role"], roles[row["role"]], template)
        for reply in replies:
            samples.append({"instruction": instruction, "input": row["question"],
                            "output": reply, "role": row["role"]})
    return samples


def count_table(selected, rows_by_split, samples_by_split):
    """Counts per role and split as lines of text, with a total line."""
    header = ["role"] + [f"{split}_{what}" for split in SPLITS for what in ("questions", "samples")]
    lines = [header]
    for role in selected + ["total"]:
        cells = [role]
        for split in SPLITS:
            rows = [r for r in rows_by_split[split] if role in (r["role"], "total")]
            samples = [s for s in samples_by_split[split] if role in (s["role"], "total")]
            cells += [str(len(rows)), str(len(samples))]
        lines.append(cells)
    widths = [max(display_width(line[i]) for line in lines) for i in range(len(header))]
    return ["  ".join(pad(cell, w, i > 0) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]


def display_width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text, width, right):
    space = " " * (width - display_width(text))
    return space + text if right else text + space


# ---------------------------------------------------------------- writing

def write_outputs(outputs):
    """Write {path: samples} atomically: all temp files first, then os.replace each."""
    temps = {}
    try:
        for path, samples in outputs.items():
            folder = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for sample in samples:
                    f.write(json.dumps(sample, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as e:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise DataError(f"{e.filename or path}: cannot write ({e.strerror})") from None


# ---------------------------------------------------------------- main

def run(args):
    roles, selected, problems = validate_args(args)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.download:
        download(args.data_dir)
    bad_lines = []
    rows_by_split, samples_by_split = {}, {}
    for split in SPLITS:
        rows = read_split(args.data_dir, split, selected, args.skip_bad, bad_lines)
        if not rows:
            raise DataError(f"{args.data_dir}: no {split} questions for roles {', '.join(selected)}")
        rows_by_split[split] = rows
        samples_by_split[split] = make_samples(rows, roles, args.max_replies, args.seed,
                                               args.system_template)
    write_outputs({args.train_out: samples_by_split["train"],
                   args.test_out: samples_by_split["test"]})
    for line in count_table(selected, rows_by_split, samples_by_split):
        print(line)
    if args.skip_bad:
        print(f"skipped {len(bad_lines)} bad lines")
    print(f"wrote {len(samples_by_split['train'])} samples to {args.train_out}")
    print(f"wrote {len(samples_by_split['test'])} samples to {args.test_out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        status = run(args)
    except DataError as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()

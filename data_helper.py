"""Turn RoleBench-zh into chat samples for role-play fine-tuning.

The small sample shipped with the repository (the default paths):
    python data_helper.py
The real RoleBench-zh files, in a folder (or fetched from the Hugging Face hub with --download):
    python data_helper.py --data_dir data/rolebench --download \\
        --train_out data/train.jsonl --test_out data/test.jsonl
Other roles, more replies per question, another seed:
    python data_helper.py --data_dir data/rolebench --roles 皇帝,华妃 --max_replies 3 --seed 7

Input: --data_dir holds the four RoleBench-zh files under their RoleBench names
(rolebench-zh_{general,role_specific}_{train,test}.jsonl). For each split the general file and
the role-specific file are merged, in that order. --roles_file is a JSON object role name ->
description (RoleBench's profiles-zh_desc.json has that shape and works too).

Per split: rows of roles not among --roles are skipped (still checked); the leading "<role>，"
that addresses the role is removed from the question, and nothing else; each split gets its own
random.Random(seed), and of a question with more than --max_replies replies that many are picked
(kept in their order); every kept reply becomes one sample.

Output rows: {"instruction": system prompt, "input": question, "output": reply, "role": role}, and
beside --train_out a prompts.json with the template and each role's system prompt, which train.py
records in its checkpoints. All outputs are written at once, after all input was read and checked.

Errors: bad arguments print one "error: ..." line each (all of them) and exit 2; bad data prints
one line "error: path:line: what is wrong" and exits 1. With --skip_bad, bad lines are skipped
and counted instead.
"""

import argparse
import json
import os
import random
import sys
import unicodedata

from utils import HelpFormatter, UserError, exit_on_problems, exit_on_user_error
from utils.prompts import DEFAULT_ROLES_FILE, PROMPTS_FILE, SYSTEM_TEMPLATE
from utils.rolebench import DEFAULT_ROLES, HUB_REPO_ID, INPUT_FILES, KINDS, SPLITS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="Exit status: 0 ok, 1 bad data or download failure, 2 bad arguments.")
    group = parser.add_argument_group("input")
    group.add_argument("--data_dir", default="data/sample",
                       help="folder with the four RoleBench-zh jsonl files under their RoleBench names")
    group.add_argument("--roles_file", default=os.path.relpath(DEFAULT_ROLES_FILE),
                       help="JSON object role name -> description, for the system prompts; RoleBench's "
                            "profiles-zh_desc.json also works")
    group.add_argument("--download", action="store_true",
                       help=f"first fetch the files missing from --data_dir from the Hugging Face hub dataset "
                            f"{HUB_REPO_ID}; existing files are never overwritten")
    group = parser.add_argument_group("output")
    group.add_argument("--train_out", default="data/train.jsonl", help="train samples, jsonl")
    group.add_argument("--test_out", default="data/test.jsonl", help="test samples, jsonl")
    group.add_argument("--system_template", default=SYSTEM_TEMPLATE,
                       help="system prompt template with {role} and {description} placeholders "
                            "(default: the built-in Chinese template, utils/prompts.py)")
    group = parser.add_argument_group("selection")
    group.add_argument("--roles", default=",".join(DEFAULT_ROLES),
                       help="comma-separated roles to keep, each in --roles_file; rows of other roles are skipped")
    group.add_argument("--max_replies", type=int, default=2,
                       help="keep at most this many replies per question, one sample each")
    group.add_argument("--seed", type=int, default=1234, help="seed for choosing which replies to keep")
    group = parser.add_argument_group("robustness")
    group.add_argument("--skip_bad", action="store_true",
                       help="skip bad lines (with a warning each) and report how many, instead of stopping "
                            "at the first one")
    return parser.parse_args(argv)


def check_output_path(path, input_paths):
    """The problem with an output path, or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{path}: output folder {folder} does not exist"
    if os.path.isdir(path):
        return f"{path}: output path is a directory"
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(path, p) for p in input_paths):
        return f"{path}: output would overwrite an input file"
    return None


def validate_args(args):
    """Check every argument; return (roles dict, selected role names, problems)."""
    from utils.prompts import check_template, load_roles
    from utils.rolebench import split_roles

    problems, roles = [], {}
    selected = split_roles(args.roles)
    if not selected:
        problems.append("--roles: no role given")
    try:
        roles = load_roles(args.roles_file)
    except UserError as error:
        problems.append(str(error))
    else:
        unknown = [name for name in selected if name not in roles]
        if unknown:
            problems.append(f"--roles: {', '.join(unknown)} not in {args.roles_file} (known: {', '.join(roles)})")
    if args.max_replies < 1:
        problems.append(f"--max_replies: must be at least 1, got {args.max_replies}")
    template_problem = check_template(args.system_template)
    if template_problem:
        problems.append(f"--system_template: {template_problem}")
    input_paths = [os.path.join(args.data_dir, name) for name in INPUT_FILES.values()]
    if not args.download:
        if not os.path.isdir(args.data_dir):
            problems.append(f"{args.data_dir}: data folder not found (put the RoleBench-zh files there, or add "
                            f"--download to fetch them)")
        else:
            problems.extend(f"{p}: input file not found (add --download to fetch it)" for p in input_paths
                            if not os.path.isfile(p))
    for path in (args.train_out, args.test_out):
        problem = check_output_path(path, input_paths)
        if problem:
            problems.append(problem)
    if os.path.abspath(args.train_out) == os.path.abspath(args.test_out):
        problems.append(f"--train_out and --test_out are the same file: {args.train_out}")
    return roles, selected, problems


def read_split(data_dir, split, selected, bad_lines, skip_bad):
    """Checked question rows of the selected roles for one split, general file first, in file order."""
    from utils.rolebench import read_rows

    def skip(message):
        print(f"warning: skipped {message}", file=sys.stderr)
        bad_lines.append(message)

    rows = []
    for kind in KINDS:
        path = os.path.join(data_dir, INPUT_FILES[(kind, split)])
        rows += [row for row in read_rows(path, skip if skip_bad else None) if row["role"] in selected]
    return rows


def make_samples(rows, prompts, max_replies, seed):
    rng = random.Random(seed)
    samples = []
    for row in rows:
        replies = row["replies"]
        if len(replies) > max_replies:
            keep = sorted(rng.sample(range(len(replies)), max_replies))
            replies = [replies[i] for i in keep]
        samples += [{"instruction": prompts[row["role"]], "input": row["question"], "output": reply,
                     "role": row["role"]} for reply in replies]
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
    return ["  ".join(pad(cell, w, i > 0) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines]


def display_width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text, width, right):
    space = " " * (width - display_width(text))
    return space + text if right else text + space


def main(argv=None):
    args = parse_args(argv)
    roles, selected, problems = validate_args(args)
    exit_on_problems(problems)

    from utils import jsonl_text, write_files
    from utils.prompts import build_system_prompt
    from utils.rolebench import download

    if args.download:
        download(args.data_dir)
    prompts = {name: build_system_prompt(name, roles[name], args.system_template) for name in selected}
    bad_lines, rows_by_split, samples_by_split = [], {}, {}
    for split in SPLITS:
        rows = read_split(args.data_dir, split, selected, bad_lines, args.skip_bad)
        if not rows:
            raise UserError(f"{args.data_dir}: no {split} questions for roles {', '.join(selected)}")
        rows_by_split[split] = rows
        samples_by_split[split] = make_samples(rows, prompts, args.max_replies, args.seed)
    prompts_path = os.path.join(os.path.dirname(os.path.abspath(args.train_out)), PROMPTS_FILE)
    side_file = {"system_template": args.system_template,
                 "roles": {name: {"system": prompt, "greeting": None} for name, prompt in prompts.items()}}
    try:
        write_files({args.train_out: jsonl_text(samples_by_split["train"]),
                     args.test_out: jsonl_text(samples_by_split["test"]),
                     prompts_path: json.dumps(side_file, ensure_ascii=False, indent=2) + "\n"})
    except OSError as error:
        raise UserError(f"{error.filename or args.train_out}: cannot write ({error.strerror})") from None
    for line in count_table(selected, rows_by_split, samples_by_split):
        print(line)
    if args.skip_bad:
        print(f"skipped {len(bad_lines)} bad lines")
    print(f"wrote {len(samples_by_split['train'])} samples to {args.train_out}")
    print(f"wrote {len(samples_by_split['test'])} samples to {args.test_out}")


if __name__ == "__main__":
    exit_on_user_error(main)

"""Turn RoleBench-zh into chat samples for role-play fine-tuning.

The small sample shipped with the repository (the default paths):
    python data_helper.py
The real RoleBench-zh files, in a folder (or fetched from the Hugging Face hub with --download):
    python data_helper.py --data_dir data/rolebench --download \\
        --train_out data/train.jsonl --test_out data/test.jsonl
Other roles, more replies per question, another seed:
    python data_helper.py --data_dir data/rolebench --roles 皇帝,华妃 --max_replies 3 --seed 7
Your own character: a card (JSON or PNG, or a folder of cards) and your own multi-turn dialogues:
    python data_helper.py --card cards/阿绣.png --dialogues my_chats.jsonl
With lorebooks (SillyTavern World Info files), SillyTavern chat logs and group scenes:
    python data_helper.py --roles 孙悟空,张飞,李白 --lorebook data/sample/world_info.json \
        --st_chats data/sample/st_chats --dialogues data/sample/scenes/three_at_a_table.jsonl
Mixed with RoleBench roles (name them: with --card or --dialogues, none are taken by default):
    python data_helper.py --card cards/阿绣.png --roles 孙悟空,张飞 --data_dir data/rolebench
The prompts as SillyTavern sends them (to serve with web_demo.py --client_system client):
    python data_helper.py --card cards/阿绣.png --prompt_style sillytavern --user_name 老王

Input: --data_dir holds the four RoleBench-zh files under their RoleBench names
(rolebench-zh_{general,role_specific}_{train,test}.jsonl). For each split the general file and
the role-specific file are merged, in that order. --roles_file is a JSON object role name ->
description (RoleBench's profiles-zh_desc.json has that shape and works too).

Per split: rows of roles not among --roles are skipped (still checked); the leading "<role>，"
that addresses the role is removed from the question, and nothing else; each split gets its own
random.Random(seed), and of a question with more than --max_replies replies that many are picked
(kept in their order); every kept reply becomes one sample.

Characters of your own (utils/cards.py): --card takes a SillyTavern/TavernAI character card
(JSON V1/V2/V3, or PNG with the card in its `chara` or `ccv3` chunk) or a folder of them. Its name,
description, personality and scenario make the system prompt through --system_template (its own
system_prompt with --card_system_prompt; --prompt_style sillytavern writes it as SillyTavern's default
Chat Completion preset joins it instead, utils/prompts.py), first_mes its greeting, and each <START> block of
mes_example one multi-turn sample. --dialogues takes jsonl files of your own conversations, as
OpenAI {"messages": [...]} or ShareGPT {"conversations": [...], "system": ...} rows; a row names its
character with "role" (or belongs to the only character given), and its system prompt becomes that
character's, so that each role is trained on one prompt. Card and dialogue samples are split into
train and test per character with random.Random(seed), --test_ratio of them for test. A dialogue
counts as one question and one sample in the table.

Lorebooks, greetings, notes, logs and scenes: a card's character_book and --lorebook files fire on
each conversation as SillyTavern fires them (utils/lorebook.py), its post_history_instructions and
depth prompt follow the history, and the row holds the prompt that results ("lore" lists the
entries, "base_system" the character's own prompt). A card's dialogues open with its first_mes as
context ("train": false). --st_chats reads SillyTavern's chat logs (utils/st_chats.py); a group log,
or a --dialogues row whose assistant turns carry several "name"s, trains each character given from
its own seat (utils/scenes.py).

Output rows: {"instruction": system prompt, "input": question, "output": reply, "role": role} for
RoleBench, {"messages": [system, user, assistant, ...], "role": role, "greeting": ...} for cards and
dialogues, and beside --train_out a prompts.json with the template, which train.py records in its
checkpoints with each role's system prompt and greeting from the samples. All outputs are written at once, after all
input was read and checked.

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
from collections import Counter

from utils.cli import HelpFormatter, UserError, exit_on_problems, exit_on_user_error
from utils.cards import USER_NAME
from utils.files import MAX_LINE_BYTES
from utils.assembly import DEFAULT_USER
from utils.prompts import DEFAULT_ROLES_FILE, PROMPT_STYLES, PROMPTS_FILE, SYSTEM_TEMPLATE, default_user_name
from utils.rolebench import DEFAULT_ROLES, HUB_REPO_ID, INPUT_FILES, KINDS, SPLITS


def add_own_character_args(parser) -> None:
    """--card, --dialogues, --lorebook, --st_chats and what shapes their samples."""
    group = parser.add_argument_group("your own characters")
    group.add_argument("--card", action="append", metavar="FILE",
                       help="a character card (.json V1/V2/V3, or .png) or a folder of them, repeatable: each "
                            "character's example dialogues become samples")
    group.add_argument("--dialogues", action="append", metavar="FILE",
                       help="a jsonl file of your own conversations (OpenAI messages or ShareGPT rows), repeatable")
    group.add_argument("--lorebook", action="append", metavar="FILE",
                       help="a SillyTavern World Info file (JSON), repeatable: its entries fire on every card, "
                            "dialogue, chat log and scene sample, after the card's own character_book")
    group.add_argument("--st_chats", action="append", metavar="FILE_OR_DIR",
                       help="a SillyTavern chat log (.jsonl) or a folder of them, repeatable: one-on-one logs "
                            "train their character, group logs each character given from its own seat")
    group.add_argument("--card_system_prompt", action="store_true",
                       help="use a card's own system_prompt ({{original}}: the one --system_template builds) "
                            "instead of the built one")
    group.add_argument("--user_name",
                       help=f"what {{{{user}}}} stands for in cards (default: {USER_NAME}; with --prompt_style "
                            f"sillytavern {DEFAULT_USER}, SillyTavern's default persona name: set it to yours)")
    group.add_argument("--test_ratio", type=float, default=0.1,
                       help="share of each character's card and dialogue samples that go to --test_out")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="Exit status: 0 ok, 1 bad data or download failure, 2 bad arguments.")
    group = parser.add_argument_group("input")
    group.add_argument("--data_dir", default="data/sample",
                       help="folder with the four RoleBench-zh jsonl files under their RoleBench names")
    group.add_argument("--roles_file", default=os.path.relpath(DEFAULT_ROLES_FILE),
                       help="JSON object role name -> description, for the system prompts of --roles; RoleBench's "
                            "profiles-zh_desc.json also works, and so does a character card or a folder of cards")
    group.add_argument("--download", action="store_true",
                       help=f"first fetch the files missing from --data_dir from the Hugging Face hub dataset "
                            f"{HUB_REPO_ID}; existing files are never overwritten")
    add_own_character_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--train_out", default="data/train.jsonl", help="train samples, jsonl")
    group.add_argument("--test_out", default="data/test.jsonl", help="test samples, jsonl")
    group.add_argument("--system_template", default=SYSTEM_TEMPLATE,
                       help="system prompt template with {role} and {description} placeholders "
                            "(default: the built-in Chinese template, utils/prompts.py)")
    group.add_argument("--prompt_style", choices=PROMPT_STYLES, default="project",
                       help="how each role's or card's system prompt is written: 'project' fills "
                            "--system_template; 'sillytavern' joins it as SillyTavern 1.19.0's default Chat "
                            "Completion preset sends it (Main Prompt, description, personality, scenario, "
                            "[Example Chat] and the examples, [Start a new Chat]; a card's system_prompt replaces "
                            "the Main Prompt), so that a model served with web_demo.py --client_system client "
                            "sees the prompt it trained on")
    group = parser.add_argument_group("selection")
    group.add_argument("--roles",
                       help=f"comma-separated RoleBench roles to keep, each in --roles_file; rows of other roles are "
                            f"skipped (default: {','.join(DEFAULT_ROLES)}, or none with --card or --dialogues)")
    group.add_argument("--max_replies", type=int, default=2,
                       help="keep at most this many replies per question, one sample each")
    group.add_argument("--seed", type=int, default=1234, help="seed for choosing which replies to keep")
    group = parser.add_argument_group("robustness")
    group.add_argument("--skip_bad", action="store_true",
                       help="skip bad lines (with a warning each) and report how many, instead of stopping "
                            "at the first one")
    group.add_argument("--max_line_bytes", type=int, default=MAX_LINE_BYTES,
                       help="a line of a RoleBench or --dialogues file longer than this many bytes is bad data "
                            "(it would be read, and trained on, whole)")
    args = parser.parse_args(argv)
    args.card, args.dialogues = args.card or [], args.dialogues or []
    args.user_name = default_user_name(args.prompt_style) if args.user_name is None else args.user_name
    args.lorebook, args.st_chats = args.lorebook or [], args.st_chats or []
    return args


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
    """Check every argument; return (roles: name -> Role of the selected RoleBench roles and of the
    cards, the selected RoleBench roles, the cards, problems)."""
    from utils.prompts import check_template
    from utils.rolebench import split_roles

    problems = []
    own = bool(args.card or args.dialogues or args.st_chats)
    selected = split_roles(args.roles) if args.roles is not None else ([] if own else list(DEFAULT_ROLES))
    if args.roles is not None and not selected:
        problems.append("--roles: no role given")
    template_problem = check_template(args.system_template)
    template = SYSTEM_TEMPLATE if template_problem else args.system_template
    roles = rolebench_roles(args, selected, template, problems) if selected else {}
    if args.max_replies < 1:
        problems.append(f"--max_replies: must be at least 1, got {args.max_replies}")
    if args.max_line_bytes < 1:
        problems.append(f"--max_line_bytes: must be at least 1, got {args.max_line_bytes}")
    if template_problem:
        problems.append(f"--system_template: {template_problem}")
    cards = card_roles(args, template, roles, problems) if args.card else []
    check_sources(args, selected, problems)
    if not 0 <= args.test_ratio < 1:
        problems.append(f"--test_ratio: must be in [0, 1), got {args.test_ratio}")
    if not args.user_name.strip():
        problems.append("--user_name: empty")
    problems += path_problems(args, selected)
    return roles, selected, cards, problems


def rolebench_roles(args, selected, template, problems) -> dict:
    """The selected RoleBench roles of --roles_file (name -> Role); problems go to `problems`."""
    from utils.prompts import roles_from_file

    try:
        known = roles_from_file(args.roles_file, template, args.card_system_prompt, args.user_name, args.prompt_style)
    except UserError as error:
        problems.append(str(error))
        return {}
    unknown = [name for name in selected if name not in known]
    if unknown:
        problems.append(f"--roles: {', '.join(unknown)} not in {args.roles_file} (known: {', '.join(known)})")
    return {name: known[name] for name in selected if name in known}


def card_roles(args, template, roles, problems) -> list:
    """The cards of --card, each put into `roles` under its name (a card of a RoleBench role's name
    gives that role its prompt); problems go to `problems`."""
    from utils.cards import read_cards
    from utils.prompts import card_role

    cards = read_cards(args.card, problems.append)
    for card in cards:
        try:
            roles[card.name] = card_role(card, template, args.card_system_prompt, args.user_name, args.prompt_style)
        except UserError as error:
            problems.append(str(error))
    return cards


def check_sources(args, selected, problems) -> None:
    """The dialogue, chat log and lorebook inputs; the lorebooks read go to args.books."""
    from utils.lorebook import read_lorebook

    problems += [f"{path}: dialogues file not found" for path in args.dialogues if not os.path.isfile(path)]
    problems += [f"{path}: chat log not found" for path in args.st_chats if not os.path.exists(path)]
    if (args.dialogues or args.st_chats) and not selected and not args.card:
        problems.append(f"{'--dialogues' if args.dialogues else '--st_chats'}: no character to train them for: "
                        f"give --card or --roles")
    args.books = []
    for path in args.lorebook:
        try:
            args.books.append(read_lorebook(path))
        except UserError as error:
            problems.append(str(error))


def path_problems(args, selected) -> list[str]:
    """The problems with RoleBench's input files and with the three outputs."""
    problems = []
    input_paths = [os.path.join(args.data_dir, name) for name in INPUT_FILES.values()] if selected else []
    if selected and not args.download:
        if not os.path.isdir(args.data_dir):
            problems.append(f"{args.data_dir}: data folder not found (put the RoleBench-zh files there, or add "
                            f"--download to fetch them)")
        else:
            problems.extend(f"{p}: input file not found (add --download to fetch it)" for p in input_paths
                            if not os.path.isfile(p))
    input_paths += args.card + args.dialogues + args.lorebook + [p for p in args.st_chats if os.path.isfile(p)]
    input_paths += [args.roles_file] if selected else []
    outputs = [args.train_out, args.test_out]
    if os.path.isdir(os.path.dirname(prompts_path(args))):  # else --train_out's problem says it
        outputs.append(prompts_path(args))
    for path in outputs:
        problem = check_output_path(path, input_paths)
        if problem:
            problems.append(problem)
    outputs = [os.path.abspath(p) for p in (args.train_out, args.test_out, prompts_path(args))]
    if len(set(outputs)) < len(outputs):
        problems.append(f"--train_out, --test_out and the {PROMPTS_FILE} written beside --train_out must be three "
                        f"different files: {args.train_out}, {args.test_out}")
    return problems


def prompts_path(args) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(args.train_out)), PROMPTS_FILE)


def read_split(data_dir, split, selected, skip, max_line_bytes):
    """Checked question rows of the selected roles for one split, general file first, in file order;
    a bad line is a UserError, or with `skip` handed to it."""
    from utils.rolebench import read_rows

    rows = []
    for kind in KINDS:
        path = os.path.join(data_dir, INPUT_FILES[(kind, split)])
        rows += [row for row in read_rows(path, skip, max_line_bytes) if row["role"] in selected]
    return rows


def make_samples(rows, roles, max_replies, seed):
    rng = random.Random(seed)
    samples = []
    for row in rows:
        replies = row["replies"]
        if len(replies) > max_replies:
            keep = sorted(rng.sample(range(len(replies)), max_replies))
            replies = [replies[i] for i in keep]
        role = roles[row["role"]]
        greeting = {"greeting": role.greeting} if role.greeting else {}
        samples += [{"instruction": role.system, "input": row["question"], "output": reply, "role": role.name,
                     **greeting} for reply in replies]
    return samples


def conversation_sample(role, turns, context):
    """A multi-turn sample of `role`: the messages its prompt context (utils.lorebook) gives for its
    last trained reply, then that reply; None without one. The whole row trains on one prompt, the
    one served for that last reply: the entries the conversation before it fires, and the notes
    after the history folded into the last user turn (earlier replies see them too)."""
    replies = [i for i, m in enumerate(turns) if m["role"] == "assistant" and m.get("train", True)]
    if not replies:
        return None
    plain = [{k: v for k, v in m.items() if k != "name"} for m in turns[: replies[-1] + 1]]
    messages, lore = context.apply([{"role": "system", "content": role.system}, *plain[:-1]])
    row = {"messages": [*messages, plain[-1]], "role": role.name}
    if role.greeting:
        row["greeting"] = role.greeting
    if messages[0]["content"] != role.system:
        row["base_system"] = role.system
    if lore:
        row["lore"] = lore
    return row


def card_samples(card, role, context, user_name):
    """A card's example dialogues, each opened by its greeting as context (not trained on) where
    the dialogue starts with the user, as a chat with the card starts."""
    from utils.cards import card_dialogues

    opening = [{**m, "train": False} for m in role.opening()]
    return [conversation_sample(role, (opening if turns[0]["role"] == "user" else []) + turns, context)
            for turns in card_dialogues(card, user_name)]


def scene_samples(scene, roles, contexts, user_name):
    """A group scene's samples: one for each character given, from its own seat (utils.scenes)."""
    from dataclasses import replace

    from utils.scenes import group_note, seat, speakers

    names = [name for name in speakers(scene) if name in roles]
    if not names:
        raise ValueError(f"none of the scene's characters ({', '.join(speakers(scene))}) is among the characters "
                         f"given ({', '.join(roles)})")
    return [conversation_sample(roles[name], seat(scene, name, user_name),
                                replace(contexts[name], extra_system=group_note(name))) for name in names]


def dialogue_samples(paths, roles, contexts, user_name, skip, max_line_bytes):
    """The user's own conversations as samples: each row of its "role" (or of the only character
    given), with that character's system prompt; a row whose assistant turns have several names is
    a group scene. A bad row is a UserError naming file and line, or with `skip` handed to it."""
    if not paths:
        return []  # and no torch to import (utils.data) for nothing
    from utils.files import read_jsonl
    from utils.data import row_messages, system_of

    only = next(iter(roles)) if len(roles) == 1 else None
    samples, replaced, no_reply = [], 0, 0
    for path in paths:
        for line_no, row in read_jsonl(path, max_line_bytes, skip):
            try:
                messages = row_messages(row, scene=True)
                system = system_of(messages)
                turns = messages[1:] if system else messages
                if len({m.get("name") for m in turns if m["role"] == "assistant"}) > 1:
                    samples += [s for s in scene_samples(turns, roles, contexts, user_name) if s]
                    continue
                name = row.get("role") or only
                if name not in roles:
                    raise ValueError(f"role {name!r} is not among the characters given ({', '.join(roles)})" if name
                                     else f"no \"role\" field to say whose dialogue it is ({', '.join(roles)})")
            except ValueError as error:
                if skip is None:
                    raise UserError(f"{path}:{line_no}: {error}") from None
                skip(f"{path}:{line_no}: {error}")
                continue
            replaced += bool(system) and system != roles[name].system
            sample = conversation_sample(roles[name], turns, contexts[name])
            if sample is None:
                no_reply += 1
                continue
            samples.append(sample)
    if replaced:
        print(f"note: {replaced} dialogues had a system prompt of their own: each now has its character's, "
              f"the one prompt per role that the model records", file=sys.stderr)
    if no_reply:
        print(f"note: {no_reply} dialogues without a reply left out", file=sys.stderr)
    return samples


def st_chat_samples(paths, roles, contexts, user_name, max_line_bytes):
    """SillyTavern chat logs as samples (utils.st_chats): a one-on-one log trains its character, a
    group log each character given from its own seat. What was left out is counted and printed: a
    log without any character given is left out (SillyTavern's chats folder holds every character's
    logs), not refused."""
    from utils.scenes import speakers
    from utils.st_chats import log_files, read_log

    samples, dropped, kinds, others = [], Counter(), Counter(), set()
    for path in (f for p in paths for f in log_files(p)):
        scene = read_log(path, user_name, dropped, max_line_bytes)
        names = speakers(scene)
        if not any(name in roles for name in names):
            dropped["logs of characters not given"] += 1
            others.update(names)
            continue
        if len(names) > 1:
            kinds["group"] += 1
            samples += [s for s in scene_samples(scene, roles, contexts, user_name) if s]
            continue
        kinds["one-on-one"] += 1
        sample = conversation_sample(roles[names[0]], scene, contexts[names[0]])
        if sample is None:
            dropped["logs without a reply after the greeting"] += 1
        else:
            samples.append(sample)
    if paths:
        left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())) or "nothing"
        print(f"SillyTavern chats: {kinds['one-on-one']} one-on-one and {kinds['group']} group logs, "
              f"{len(samples)} samples; left out: {left_out}")
        if others:
            print(f"note: SillyTavern logs of {', '.join(sorted(others))} left out: not among the characters given "
                  f"({', '.join(roles)})", file=sys.stderr)
    return samples


def split_own(samples, test_ratio, seed):
    """(train, test) of the card and dialogue samples: per character, round(n x test_ratio) of them
    drawn for test with random.Random(seed); each part keeps the samples' order."""
    rng = random.Random(seed)
    by_role, train, test = {}, [], []
    for sample in samples:
        by_role.setdefault(sample["role"], []).append(sample)
    for items in by_role.values():
        picked = set(rng.sample(range(len(items)), round(len(items) * test_ratio)))
        train += [s for i, s in enumerate(items) if i not in picked]
        test += [s for i, s in enumerate(items) if i in picked]
    return train, test


def count_table(selected, rows_by_split, samples_by_split):
    """Counts per role and split as lines of text, with a total line."""
    header = ["role"] + [f"{split}_{what}" for split in SPLITS for what in ("questions", "samples")]
    # one pass over each list: a scan of it per role was minutes for a folder of 10,000 cards
    counts = {split: (Counter(r["role"] for r in rows_by_split[split]), Counter(s["role"] for s in samples_by_split[split]))
              for split in SPLITS}
    lines = [header]
    for role in selected:
        lines.append([role] + [str(count[role]) for split in SPLITS for count in counts[split]])
    lines.append(["total"] + [str(len(part[split])) for split in SPLITS for part in (rows_by_split, samples_by_split)])
    widths = [max(display_width(line[i]) for line in lines) for i in range(len(header))]
    return ["  ".join(pad(cell, w, i > 0) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines]


def display_width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text, width, right):
    space = " " * (width - display_width(text))
    return space + text if right else text + space


def main(argv=None):
    args = parse_args(argv)
    roles, selected, cards, problems = validate_args(args)
    exit_on_problems(problems)

    from utils.lorebook import Context
    from utils.rolebench import download

    if args.download and selected:
        download(args.data_dir)
    bad_lines = []

    def skip(message):
        print(f"warning: skipped {message}", file=sys.stderr)
        bad_lines.append(message)

    skip_bad = skip if args.skip_bad else None
    rows_by_split, samples_by_split = rolebench_samples(args, selected, roles, skip_bad)
    books = tuple(args.books)
    contexts = {name: Context(name, args.user_name, books) for name in roles}
    contexts.update({card.name: card.context(args.user_name, books) for card in cards})
    own = [s for card in cards for s in card_samples(card, roles[card.name], contexts[card.name], args.user_name) if s]
    own += dialogue_samples(args.dialogues, roles, contexts, args.user_name, skip_bad, args.max_line_bytes)
    own += st_chat_samples(args.st_chats, roles, contexts, args.user_name, args.max_line_bytes)
    for split, part in zip(SPLITS, split_own(own, args.test_ratio, args.seed)):
        rows_by_split[split] += part  # a dialogue counts as one question and one sample
        samples_by_split[split] += part
    names = selected + [name for name in roles if name not in selected]
    check_trained(names, samples_by_split["train"])
    write_outputs(args, samples_by_split, side_file(args, roles, contexts))
    for line in count_table(names, rows_by_split, samples_by_split):
        print(line)
    if args.skip_bad:
        print(f"skipped {len(bad_lines)} bad lines")
    print(f"wrote {len(samples_by_split['train'])} samples to {args.train_out}")
    print(f"wrote {len(samples_by_split['test'])} samples to {args.test_out}")
    if not samples_by_split["test"]:
        print("note: no test samples (see --test_ratio): train without --test_path", file=sys.stderr)


def rolebench_samples(args, selected, roles, skip) -> tuple[dict, dict]:
    """The RoleBench questions of the selected roles, and their samples, by split."""
    rows_by_split, samples_by_split = {}, {}
    for split in SPLITS:
        rows = read_split(args.data_dir, split, selected, skip, args.max_line_bytes) if selected else []
        if selected and not rows:
            raise UserError(f"{args.data_dir}: no {split} questions for roles {', '.join(selected)}")
        rows_by_split[split] = rows
        samples_by_split[split] = make_samples(rows, roles, args.max_replies, args.seed)
    return rows_by_split, samples_by_split


def check_trained(names, train_samples) -> None:
    """No training sample at all is an error; a character without one is a note."""
    if not train_samples:
        raise UserError(f"no training sample for {', '.join(names)}: no dialogues (a card's mes_example, or "
                        f"--dialogues rows with replies) and no RoleBench questions left for training")
    trained = {s["role"] for s in train_samples}
    for name in names:
        if name not in trained:
            print(f"note: no training sample for {name} (a card without mes_example dialogues, and none of "
                  f"--dialogues): it is not trained", file=sys.stderr)


def side_file(args, roles, contexts) -> dict:
    """The record written beside --train_out for serving."""
    side = {"system_template": args.system_template, "prompt_style": args.prompt_style, "user_name": args.user_name}  # train.py takes the roles' prompts from the samples
    # what each character's prompt gets beyond its system prompt (utils.lorebook.Context), for the
    # record that serving will read: the same lorebooks and notes, fired on the live chat
    extras = {name: context.to_json() for name, context in contexts.items()
              if context.books or context.depth_note or context.post_history}
    if extras:
        side["contexts"] = extras
    # not trained on, but recorded, so that the page offers them with the trained model
    alternates = {name: list(role.alternates) for name, role in roles.items() if role.alternates}
    if alternates:
        side["alternate_greetings"] = alternates
    return side


def write_outputs(args, samples_by_split, side) -> None:
    """The train and test samples and the side file, all written or none."""
    from utils.files import jsonl_text, write_files

    try:
        write_files({args.train_out: jsonl_text(samples_by_split["train"]),
                     args.test_out: jsonl_text(samples_by_split["test"]),
                     prompts_path(args): json.dumps(side, ensure_ascii=False, indent=2) + "\n"})
    except OSError as error:
        raise UserError(f"{error.filename or args.train_out}: cannot write ({error.strerror})") from None


if __name__ == "__main__":
    exit_on_user_error(main)

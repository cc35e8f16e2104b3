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
    python data_helper.py --roles 孙悟空,张飞,李白 --lorebook data/sample/world_info.json \\
        --st_chats data/sample/st_chats --dialogues data/sample/scenes/three_at_a_table.jsonl
Mixed with RoleBench roles (name them: with --card or --dialogues, none are taken by default):
    python data_helper.py --card cards/阿绣.png --roles 孙悟空,张飞 --data_dir data/rolebench
The prompts as SillyTavern sends them (to serve with web_demo.py --client_system client):
    python data_helper.py --card cards/阿绣.png --prompt_style sillytavern --user_name 老王
Preference pairs (train.py --stage dpo) from SillyTavern swipes, and from a model's replies out of character:
    python data_helper.py --roles 孙悟空,张飞,李白 --st_chats data/sample/st_chats --pairs_out data/pairs.jsonl \\
        --rejected_from baichuan-inc/Baichuan2-7B-Chat --max_pairs 200

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
train and test per character with random.Random(seed), --test_ratio of them for test, a conversation's
samples together. A conversation counts as one question in the table; it is one sample, or with a
lorebook or notes one sample per reply (each reply's prompt is then its own).

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

Preference pairs (--pairs_out, utils/pair_sources.py): rows of utils/pairs.py, each sample's shape
up to a reply plus "chosen" and "rejected". A SillyTavern reply with other swipes gives one pair per
other swipe, on the prompt its sample trains it with. With --rejected_from, each sample (at most
--max_pairs of a split, drawn with --seed) gives a pair of its reply against what that model says to
its history without the system prompt, as a generic assistant (greedy unless --temperature is set);
a generated reply that is empty or the sample's own is left out and counted. A sample's pairs go
with it: the train samples' to --pairs_out, the test samples' to --pairs_test_out.

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

from utils.chat import add_generation_args, check_settings
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


def add_pair_args(parser) -> None:
    """--pairs_out and the model that writes rejected replies (module docstring)."""
    group = parser.add_argument_group("preference pairs (train.py --stage dpo)")
    group.add_argument("--pairs_out", metavar="FILE",
                       help="write the train samples' preference pairs here, jsonl: every other swipe of a "
                            "SillyTavern reply against the kept one, and with --rejected_from a model's reply "
                            "out of character against the sample's")
    group.add_argument("--pairs_test_out", metavar="FILE",
                       help="the test samples' pairs (default: --pairs_out with _test before its extension)")
    group.add_argument("--rejected_from", metavar="MODEL",
                       help="a model directory (merged, or the base with --adapter) whose replies to each "
                            "sample's history without the system prompt are the rejected ones")
    group.add_argument("--adapter", help="a LoRA adapter directory to put on --rejected_from")
    group.add_argument("--max_pairs", type=int, metavar="N",
                       help="give --rejected_from at most N samples of each split, drawn with --seed "
                            "(default: every sample)")
    group.add_argument("--device", default="auto", help="--rejected_from's device: auto, cpu, cuda or cuda:N")
    group.add_argument("--quantization_bit", type=int, choices=(4, 8),
                       help="load --rejected_from in 4 or 8 bits (bitsandbytes), as predict.py does")
    group = add_generation_args(parser, "sampling of --rejected_from")
    group.description = "greedy unless --temperature is set above 0; seeded with --seed"
    parser.set_defaults(temperature=0.0)  # greedy: the model's likeliest reply, the same on every run


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
    group.add_argument("--seed", type=int, default=1234,
                       help="seed for choosing which replies to keep, the test samples, --max_pairs's samples "
                            "and --rejected_from's sampling")
    add_pair_args(parser)
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
    if args.pairs_out and not args.pairs_test_out:
        stem, extension = os.path.splitext(args.pairs_out)
        args.pairs_test_out = f"{stem}_test{extension or '.jsonl'}"
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
    problems += path_problems(args, selected) + pair_problems(args)
    return roles, selected, cards, problems


def pair_problems(args) -> list[str]:
    """The problems with the pair flags (their output paths are path_problems')."""
    problems = []
    needs = {"--pairs_out": ("pairs_test_out", "rejected_from"), "--rejected_from": ("adapter", "max_pairs")}
    for needed, flags in needs.items():
        if not getattr(args, needed[2:]):
            problems += [f"--{flag}: needs {needed}" for flag in flags if getattr(args, flag) is not None]
    if args.max_pairs is not None and args.max_pairs < 1:
        problems.append(f"--max_pairs: must be at least 1, got {args.max_pairs}")
    if args.rejected_from:
        from utils.models import check_model_dir  # torch: only when a model is to be loaded

        for check, *values in [(check_settings, args.max_new_tokens, args.top_p, args.temperature),
                               (check_model_dir, args.rejected_from, "--rejected_from: model")]:
            try:
                check(*values)
            except UserError as error:
                problems.append(str(error))
        if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            problems.append(f"--adapter: adapter directory {args.adapter!r} has no adapter_config.json")
    if args.pairs_out and not (args.rejected_from or args.st_chats):
        problems.append("--pairs_out: needs a source of pairs: --st_chats logs with swipes, or --rejected_from")
    return problems


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
    pair_outputs = [args.pairs_out, args.pairs_test_out] if args.pairs_out else []
    for path in outputs + pair_outputs:
        problem = check_output_path(path, input_paths)
        if problem:
            problems.append(problem)
    outputs = [os.path.abspath(p) for p in (args.train_out, args.test_out, prompts_path(args))]
    if len(set(outputs)) < len(outputs):
        problems.append(f"--train_out, --test_out and the {PROMPTS_FILE} written beside --train_out must be three "
                        f"different files: {args.train_out}, {args.test_out}")
    pair_outputs = [os.path.abspath(p) for p in pair_outputs]
    if len(set(pair_outputs)) < len(pair_outputs) or set(pair_outputs) & set(outputs):
        problems.append(f"--pairs_out and --pairs_test_out must be two files of their own: {args.pairs_out}, "
                        f"{args.pairs_test_out}")
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


def conversation_samples(role, turns, context) -> list[dict]:
    """The samples of a multi-turn conversation of `role`, each the messages its prompt context
    (utils.lorebook) gives for a trained reply, then that reply; none without one.

    Where the context places nothing by the conversation (no lorebook, depth note or post-history
    instructions), every reply is served after the same system prompt, so one row trains them all.
    Where it does, the prompt differs from reply to reply (the entries that the conversation so far
    fires, the notes folded into the newest user turn), so each trained reply gets a row of its own,
    holding what is served at that point, the replies before it as context ("train": false)."""
    replies = [i for i, m in enumerate(turns) if m["role"] == "assistant" and m.get("train", True)]
    plain = [{k: v for k, v in m.items() if k != "name"} for m in turns]
    if not replies:
        return []
    if not context.by_conversation:
        return [reply_sample(role, plain[: replies[-1]], plain[replies[-1]], context)]
    return [reply_sample(role, [{**m, "train": False} if m["role"] == "assistant" else m for m in plain[:last]],
                         plain[last], context) for last in replies]


def reply_sample(role, before, reply, context) -> dict:
    """The row of `reply` after the messages `before`, with the role's system prompt and context."""
    messages, lore = context.apply([{"role": "system", "content": role.system}, *before])
    row = {"messages": [*messages, reply], "role": role.name}
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
    conversations = [conversation_samples(role, (opening if turns[0]["role"] == "user" else []) + turns, context)
                     for turns in card_dialogues(card, user_name)]
    return [samples for samples in conversations if samples]


def scene_samples(scene, roles, contexts, user_name):
    """A group scene's samples: those of each character given, from its own seat (utils.scenes), as one
    list: a scene goes to one split whole (a seat's replies are lines of the others' seats)."""
    from dataclasses import replace

    from utils.scenes import group_note, seat, speakers

    names = [name for name in speakers(scene) if name in roles]
    if not names:
        raise ValueError(f"none of the scene's characters ({', '.join(speakers(scene))}) is among the characters "
                         f"given ({', '.join(roles)})")
    samples = [sample for name in names
               for sample in conversation_samples(roles[name], seat(scene, name, user_name),
                                                  replace(contexts[name], extra_system=group_note(name)))]
    return [samples] if samples else []


def dialogue_samples(paths, roles, contexts, user_name, skip, max_line_bytes):
    """The user's own conversations as samples, a list for each: each row of its "role" (or of the only character
    given), with that character's system prompt; a row whose assistant turns have several names is
    a group scene. A bad row is a UserError naming file and line, or with `skip` handed to it."""
    if not paths:
        return []  # and no torch to import (utils.data) for nothing
    from utils.files import read_jsonl
    from utils.data import row_messages, system_of
    from utils.scenes import is_scene

    only = next(iter(roles)) if len(roles) == 1 else None
    samples, replaced, no_reply = [], 0, 0
    for path in paths:
        for line_no, row in read_jsonl(path, max_line_bytes, skip):
            try:
                messages = row_messages(row, scene=True)
                system = system_of(messages)
                turns = messages[1:] if system else messages
                if is_scene(turns):
                    samples += scene_samples(turns, roles, contexts, user_name)
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
            rows = conversation_samples(roles[name], turns, contexts[name])
            no_reply += not rows
            samples += [rows] if rows else []
    if replaced:
        print(f"note: {replaced} dialogues had a system prompt of their own: each now has its character's, "
              f"the one prompt per role that the model records", file=sys.stderr)
    if no_reply:
        print(f"note: {no_reply} dialogues without a reply left out", file=sys.stderr)
    return samples


def st_chat_samples(paths, roles, contexts, user_name, max_line_bytes):
    """SillyTavern chat logs as samples, a list for each conversation (utils.st_chats): a one-on-one log trains its character, a
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
            samples += scene_samples(scene, roles, contexts, user_name)
            continue
        kinds["one-on-one"] += 1
        rows = conversation_samples(roles[names[0]], scene, contexts[names[0]])
        if not rows:
            dropped["logs without a reply after the greeting"] += 1
        samples += [rows] if rows else []
    if paths:
        left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())) or "nothing"
        print(f"SillyTavern chats: {kinds['one-on-one']} one-on-one and {kinds['group']} group logs, "
              f"{sum(map(len, samples))} samples; left out: {left_out}")
        if others:
            print(f"note: SillyTavern logs of {', '.join(sorted(others))} left out: not among the characters given "
                  f"({', '.join(roles)})", file=sys.stderr)
    return samples


def split_own(conversations, test_ratio, seed):
    """(train, test) of the card and dialogue samples, a list for each conversation of a character:
    per character, round(n x test_ratio) of its conversations drawn for test with random.Random(seed),
    so that no reply is tested on a conversation that trained; each part keeps their order."""
    rng = random.Random(seed)
    by_role, train, test = {}, [], []
    for conversation in conversations:
        by_role.setdefault(conversation[0]["role"], []).append(conversation)
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
    samples_by_split = {split: with_context(samples, roles, contexts) for split, samples in samples_by_split.items()}
    # the samples of each conversation of a character, kept together: in one split, counted as one question
    own = [s for card in cards for s in card_samples(card, roles[card.name], contexts[card.name], args.user_name)]
    own += dialogue_samples(args.dialogues, roles, contexts, args.user_name, skip_bad, args.max_line_bytes)
    own += st_chat_samples(args.st_chats, roles, contexts, args.user_name, args.max_line_bytes)
    for split, part in zip(SPLITS, split_own(own, args.test_ratio, args.seed)):
        rows_by_split[split] += [conversation[0] for conversation in part]
        samples_by_split[split] += [sample for conversation in part for sample in conversation]
    names = selected + [name for name in roles if name not in selected]
    check_trained(names, samples_by_split["train"])
    pairs_by_split = make_pairs(args, samples_by_split, contexts) if args.pairs_out else {}
    if args.pairs_out and not pairs_by_split["train"]:
        raise UserError(f"--pairs_out: no training pair was made (no SillyTavern reply with other swipes among the "
                        f"train samples{', and no generated reply kept' if args.rejected_from else ''})")
    write_outputs(args, samples_by_split, side_file(args, roles, contexts), pairs_by_split)
    for line in count_table(names, rows_by_split, samples_by_split):
        print(line)
    if args.skip_bad:
        print(f"skipped {len(bad_lines)} bad lines")
    print(f"wrote {len(samples_by_split['train'])} samples to {args.train_out}")
    print(f"wrote {len(samples_by_split['test'])} samples to {args.test_out}")
    if not samples_by_split["test"]:
        print("note: no test samples (see --test_ratio): train without --test_path", file=sys.stderr)
    for split, path in zip(SPLITS, (args.pairs_out, args.pairs_test_out)):
        if split in pairs_by_split:
            print(f"wrote {len(pairs_by_split[split])} pairs to {path}")
    if pairs_by_split and not pairs_by_split["test"]:
        print(f"note: no test pairs (see --test_ratio): train --stage dpo without --test_path {args.pairs_test_out}",
              file=sys.stderr)


def make_pairs(args, samples_by_split, contexts) -> dict:
    """The preference pairs of each split's samples (module docstring), their counts printed. A
    generated reply answers the history without the character's own notes (`contexts`' depth note and
    post-history instructions, folded into the rows' user turns): they would tell it who to be."""
    from utils.pair_sources import generated_pairs, swipe_pairs

    pairs = {split: [p for s in samples for p in swipe_pairs(s)] for split, samples in samples_by_split.items()}
    lines = [f"pairs from SillyTavern swipes: {len(pairs['train'])} train, {len(pairs['test'])} test"]
    if args.rejected_from:
        reply_of, skipped = out_of_character(args), Counter()
        rng = random.Random(args.seed)
        for split, samples in samples_by_split.items():
            if args.max_pairs is not None and len(samples) > args.max_pairs:
                samples = [samples[i] for i in sorted(rng.sample(range(len(samples)), args.max_pairs))]
            made = generated_pairs(samples, reply_of, skipped, {name: c.notes() for name, c in contexts.items()})
            lines.append(f"pairs from {args.rejected_from}'s replies out of character: {len(made)} {split} of "
                         f"{len(samples)} samples")
            pairs[split] += made
        left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
        lines.append(f"generated replies left out: {left_out}")
    print("\n".join(lines))
    return pairs


def out_of_character(args):
    """The --rejected_from model's replies without a character (utils.pair_sources.OutOfCharacter)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from utils.engine import ChatEngine
    from utils.pair_sources import OutOfCharacter

    engine = ChatEngine.load(SimpleNamespace(**vars(args), model_path=args.rejected_from, trust_remote_code=False), {})
    sampling = replace(engine.defaults, seed=args.seed)
    problems = engine.check_sampling(sampling)
    if problems:
        raise UserError(f"--{next(iter(problems))}: {next(iter(problems.values()))}")
    return OutOfCharacter(engine, sampling)


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


def with_context(samples, roles, contexts) -> list[dict]:
    """RoleBench samples, each whose prompt its character's context changes (a lorebook entry its
    question fires, a depth note, post-history instructions) written as the conversation row that
    holds the prompt served for it; the others as they are."""
    out = []
    for sample in samples:
        context = contexts[sample["role"]]
        turns = [{"role": "user", "content": sample["input"]}, {"role": "assistant", "content": sample["output"]}]
        row = conversation_samples(roles[sample["role"]], turns, context)[0] if context.by_conversation else None
        out.append(row if row and ("lore" in row or row["messages"][1]["content"] != sample["input"]) else sample)
    return out


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
    extras = {name: context.to_json() for name, context in contexts.items() if context.by_conversation}
    if extras:
        side["contexts"] = extras
    # not trained on, but recorded, so that the page offers them with the trained model
    alternates = {name: list(role.alternates) for name, role in roles.items() if role.alternates}
    if alternates:
        side["alternate_greetings"] = alternates
    return side


def write_outputs(args, samples_by_split, side, pairs_by_split) -> None:
    """The train and test samples, the side file and the pairs, all written or none."""
    from utils.files import jsonl_text, write_files

    pairs = {args.pairs_out: jsonl_text(pairs_by_split["train"]),
             args.pairs_test_out: jsonl_text(pairs_by_split["test"])} if pairs_by_split else {}
    try:
        write_files({args.train_out: jsonl_text(samples_by_split["train"]),
                     args.test_out: jsonl_text(samples_by_split["test"]),
                     prompts_path(args): json.dumps(side, ensure_ascii=False, indent=2) + "\n", **pairs})
    except OSError as error:
        raise UserError(f"{error.filename or args.train_out}: cannot write ({error.strerror})") from None


if __name__ == "__main__":
    exit_on_user_error(main)

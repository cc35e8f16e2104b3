"""Evaluate role-play models on the RoleBench-zh test questions: ROUGE-L and perplexity.

The base model against the fine-tuned one (base + a LoRA checkpoint of train.py):
    python evaluate.py --data_dir data/rolebench \\
        --model base=baichuan-inc/Baichuan2-7B-Chat \\
        --model finetuned=baichuan-inc/Baichuan2-7B-Chat::runs/roleplay/epoch-1-step-501 --out_dir runs/eval
A quick look: 5 questions per split of a merged model, and the training curves of its run:
    python evaluate.py --data_dir data/rolebench --limit 5 \\
        --model merged=runs/roleplay-merged --plot_run runs/roleplay --out_dir runs/eval-quick
Only the RoleGPT (GPT-4) answers shipped with RoleBench, all test questions, no model:
    python evaluate.py --data_dir data/rolebench --baseline_only --out_dir runs/eval-rolegpt
Only the loss / ppl curves of one or more training runs:
    python evaluate.py --plot_run runs/roleplay --plot_run runs/roleplay-lr2e-4 --out_dir runs/curves

Models: `--model NAME=PATH` (a full or merged model, or a hub id) or `--model NAME=BASE::ADAPTER`
(a base plus a LoRA adapter). Each model answers with its own roles' system prompts (its
roleplay.json; a model without one gets data/roles.json, with a note); --roles_file (a roles file,
a character card or a folder of cards) gives every model the prompts built from it instead.

Test questions: with --data_dir, the two RoleBench-zh test files, each question with its split
and ALL its references: general = the paper's CUS (role-styled answers to general instructions),
role_specific = SPE (role knowledge). With --test_file (data_helper.py's jsonl) rows are grouped
into questions by role and input, split "unknown" unless a row has a "split" field; a conversation
row (OpenAI messages or ShareGPT, as data_helper.py writes for cards) asks its last user message
with the turns before it in the prompt, its last reply the reference. A role's prompt context
(lorebooks and notes, utils/lorebook.py) is applied as serving applies it; a row that data_helper.py
wrote holds its applied prompt already and is asked as written (question_prompt). A group scene
row (assistant turns of several names) asks each character's last reply from its seat.

Scores per question and model: one answer (greedy unless --do_sample), ROUGE-L F1 (beta = 1, from
the rouge-score package) on jieba words and on characters (whitespace dropped), against the first
reference and the best of all; and the perplexity of the reference replies (each + eos after the
chat prompt, token-weighted). RAW (the paper's role-free answers) cannot be measured: RoleBench-zh
ships none. Character consistency, offline, of every answer (utils/consistency.py): the share that
self-discloses as an AI (a maintained phrase list, extended by --disclosure_phrase), the share with
speaker bleed (a line starting with another test role's or the user's name and a colon), the scene
speaker bleed (the same over group-scene questions, with the scene's other speakers' names),
distinct-1/2 and the repeated 4-gram rate over characters, and the length ratio to the first
reference. The RoleGPT answers (default: ../shared/rolebench/rolebench-zh/*/rolegpt_baseline.jsonl
when present, or --baseline_file) are scored as one more row, without perplexity.

Preference pairs (--pairs_file, rows with "chosen" and "rejected" replies as train.py --stage dpo reads
them, utils/pairs.py): each model's summed log-probability of both replies (+ eos) after the pair's
prompt, laid out as the DPO stage lays them out. pref_accuracy is the share of pairs whose chosen reply
is the likelier, pref_margin the mean of log p(chosen) - log p(rejected): the policy's own preference,
no reference model, so that an SFT model and the same model after DPO are compared on one scale.

Optionally, an LLM judge (--judge_base_url, --judge_model; key from JUDGE_API_KEY) behind any
OpenAI-compatible endpoint scores every model's answers 1-5 on CharacterEval's four dimensions
(utils/judge.py), parsed strictly, with at most --judge_retries more asks per answer; unparsable
replies are counted (judge_unparsed).

Output in --out_dir: samples.jsonl (one line per model and question, appended as it goes: the same
command again resumes, and a result made with other settings or another prompt is redone),
results.json, results.md, results.png and, with --plot_run, training_curves.png.
"""

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, replace

from utils.cli import HelpFormatter, UserError, exit_on_problems, exit_on_user_error
from utils.files import read_jsonl
from utils import rolebench
from utils.judge import MAX_TOKENS as JUDGE_MAX_TOKENS
from utils.report import ResultStore, question_key, score_answer

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BASELINE_FILES = [os.path.join(ROOT, "..", "shared", "rolebench", "rolebench-zh", kind, "rolegpt_baseline.jsonl")
                          for kind in rolebench.KINDS]
BASELINE_NAME = "RoleGPT"
SPEC_SEPARATOR = "::"
SPLITS = ("general", "role_specific")  # the two RoleBench-zh test files, in report order
SAMPLES_FILE = "samples.jsonl"
PAIRS_SPLIT = "pairs"  # the split of the --pairs_file result's line in samples.jsonl, beside the questions'
# how a reply may label the user's lines when it speaks for them, beside utils.cards.USER_NAME
USER_LABELS = ("用户", "User")
MAX_SPEAKER_CHARS = 32  # a longer "...: " line opening in a written seat is text, not a speaker's name


# ---------------------------------------------------------------- arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="Exit status: 0 ok, 1 bad input, 2 bad arguments, 130 interrupted "
                                            "(run the same command again to resume).")
    group = parser.add_argument_group("models")
    group.add_argument("--model", action="append", default=[], metavar="NAME=PATH | NAME=BASE::ADAPTER",
                       help="a model to evaluate, repeatable: a full or merged model, or a base plus a LoRA adapter")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    group.add_argument("--trust_remote_code", action="store_true",
                       help="load model code from the model directory instead of the local baichuan package")
    group.add_argument("--quantization_bit", type=int, choices=(4, 8),
                       help="load every model's linear layers in 4 bits (NF4, double quantisation) or 8 bits "
                            "(bitsandbytes int8); an adapter stays unquantised on top (default: unquantised)")
    group = parser.add_argument_group("test questions")
    group.add_argument("--data_dir", default="data/sample",
                       help="folder with rolebench-zh_general_test.jsonl and rolebench-zh_role_specific_test.jsonl")
    group.add_argument("--test_file", help="instead of --data_dir: a test jsonl written by data_helper.py")
    group.add_argument("--roles_file", help="JSON object role name -> description, a character card or a folder "
                                            "of cards: the system prompts of every model (default: each model's own)")
    group.add_argument("--card_system_prompt", action="store_true",
                       help="with cards in --roles_file: use a card's own system_prompt instead of the built one")
    group.add_argument("--roles", help=f"comma-separated roles to evaluate (default: {','.join(rolebench.DEFAULT_ROLES)}"
                                       " with --data_dir, every role of --test_file)")
    group.add_argument("--limit", type=int, help="at most N questions per split, round-robin over the roles")
    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=int, default=256, help="longest answer, in tokens")
    group.add_argument("--batch_size", type=int, default=8,
                       help="questions per generate() call, and reference replies per perplexity forward")
    group.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, help="with --do_sample (default: the model's generation config)")
    group.add_argument("--top_p", type=float, help="with --do_sample (default: the model's generation config)")
    group.add_argument("--repetition_penalty", type=float,
                       help="1.0 turns it off (default: the model's generation config; 1.05 for Baichuan2)")
    group.add_argument("--seed", type=int, default=0, help="torch seed, set before each model")
    group = parser.add_argument_group("baseline")
    group.add_argument("--baseline_file", action="append", help="jsonl of RoleGPT answers (rows role, question, "
                                                                "generated: [answer]), repeatable (default: "
                                                                "../shared/rolebench's, when present)")
    group.add_argument("--no_baseline", action="store_true", help="do not score the RoleGPT answers")
    group.add_argument("--baseline_only", action="store_true", help="score only the RoleGPT answers (no model)")
    group = parser.add_argument_group("character consistency")
    group.add_argument("--disclosure_phrase", action="append", default=[], metavar="TEXT",
                       help="a phrase that counts as the answer disclosing itself as an AI, repeatable, added to "
                            "utils/consistency.py's list (作为一个人工智能, As an AI, ...)")
    group = parser.add_argument_group("preference pairs")
    group.add_argument("--pairs_file", metavar="FILE",
                       help="a pairs jsonl (rows with 'chosen' and 'rejected' replies, as train.py --stage dpo reads "
                            "them): each model's pref_accuracy and pref_margin on it")
    group = parser.add_argument_group("LLM judge (optional)")
    group.add_argument("--judge_base_url", metavar="URL",
                       help="an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) whose --judge_model scores "
                            "every model's answers 1-5 on character consistency, knowledge, personality and "
                            "conversational ability (utils/judge.py); its key from the environment's JUDGE_API_KEY")
    group.add_argument("--judge_model", metavar="NAME", help="the judge model's name at --judge_base_url")
    group.add_argument("--judge_retries", type=int, default=2,
                       help="asks more for an answer when the judge's reply does not parse (each counted)")
    group.add_argument("--judge_max_tokens", type=int, default=JUDGE_MAX_TOKENS,
                       help="the judge's longest reply, in tokens (more for a model that thinks aloud first)")
    group = parser.add_argument_group("output")
    group.add_argument("--out_dir", default="runs/eval", help=f"folder for {SAMPLES_FILE} and the report files")
    group.add_argument("--plot_run", action="append", default=[], metavar="DIR",
                       help="a training run folder (train.py's --output_dir), repeatable: its TensorBoard curves "
                            "go into training_curves.png; alone, only plots")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    adapter: str | None = None

    def settings_key(self):
        """Paths as absolute paths when they exist locally, so cwd changes do not look like new models."""
        local = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731
        return {"model": local(self.path), "adapter": local(self.adapter)}


def parse_model_spec(text):
    """`NAME=PATH` or `NAME=BASE::ADAPTER` -> ModelSpec; ValueError with the problem otherwise."""
    name, sep, target = text.partition("=")
    name = name.strip()
    if not sep or not name or not target.strip():
        raise ValueError(f"--model {text!r}: expected NAME=PATH or NAME=BASE{SPEC_SEPARATOR}ADAPTER")
    if any(c.isspace() for c in name) or name == BASELINE_NAME:
        raise ValueError(f"--model {text!r}: the name must have no spaces and not be {BASELINE_NAME!r}")
    path, sep, adapter = target.partition(SPEC_SEPARATOR)
    if sep and (not path.strip() or not adapter.strip() or SPEC_SEPARATOR in adapter):
        raise ValueError(f"--model {text!r}: expected NAME=BASE{SPEC_SEPARATOR}ADAPTER with both parts")
    return ModelSpec(name, path.strip(), adapter.strip() if sep else None)


def check_models(texts) -> tuple[list[ModelSpec], list[str]]:
    from utils.models import check_model_dir

    specs, problems = [], []
    for text in texts:
        try:
            spec = parse_model_spec(text)
        except ValueError as error:
            problems.append(str(error))
            continue
        if any(s.name == spec.name for s in specs):
            problems.append(f"--model: the name {spec.name!r} is given twice")
        specs.append(spec)
        try:
            check_model_dir(spec.path, f"--model {spec.name}: model")
        except UserError as error:
            problems.append(str(error))
        if spec.adapter is not None and not os.path.isfile(os.path.join(spec.adapter, "adapter_config.json")):
            problems.append(f"--model {spec.name}: adapter directory {spec.adapter!r} has no adapter_config.json")
    return specs, problems


def check_questions(args) -> list[str]:
    from utils.prompts import roles_from_file

    problems = []
    if args.roles is not None and not rolebench.split_roles(args.roles):
        problems.append("--roles: no role given")
    if args.roles_file is not None:
        try:
            roles_from_file(args.roles_file, card_system_prompt=args.card_system_prompt)
        except UserError as error:
            problems.append(str(error))
    if args.test_file is not None:
        if not os.path.isfile(args.test_file):
            problems.append(f"{args.test_file}: test file not found")
    elif not os.path.isdir(args.data_dir):
        problems.append(f"{args.data_dir}: data folder not found (data_helper.py --download fetches RoleBench-zh)")
    else:
        problems += [f"{path}: test file not found" for kind in rolebench.KINDS
                     if not os.path.isfile(path := os.path.join(args.data_dir, rolebench.INPUT_FILES[(kind, "test")]))]
    problems += [f"--baseline_file {path}: file not found" for path in args.baseline_file or [] if not os.path.isfile(path)]
    if args.baseline_only and not args.baseline_file and not any(map(os.path.isfile, DEFAULT_BASELINE_FILES)):
        problems.append("--baseline_only: no RoleGPT answers in ../shared/rolebench; give --baseline_file")
    return problems


def check_generation(args) -> list[str]:
    from utils.models import pick_device_dtype

    problems = [f"{flag}: must be at least 1, got {value}" for flag, value in
                (("--limit", args.limit), ("--max_new_tokens", args.max_new_tokens), ("--batch_size", args.batch_size))
                if value is not None and value < 1]
    if args.temperature is not None and not args.temperature > 0:
        problems.append(f"--temperature: must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"--top_p: must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        problems.append(f"--repetition_penalty: must be positive, got {args.repetition_penalty}")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        problems.append("--temperature / --top_p only apply with --do_sample")
    if args.model:
        try:
            pick_device_dtype(args.device)
        except UserError as error:
            problems.append(f"--device: {error}")
    return problems


def check_pairs_file(args) -> list[str]:
    from utils.pairs import read_pairs

    if not args.model:
        return ["--pairs_file scores models: give --model"]
    if not os.path.isfile(args.pairs_file):
        return [f"--pairs_file {args.pairs_file}: file not found"]
    try:
        args.pair_rows = read_pairs(args.pairs_file)  # checked once, before any model loads; pairs_entry scores them
    except UserError as error:
        return [str(error)]
    return []


def check_judge(args) -> list[str]:
    from urllib.parse import urlsplit

    problems = []
    if (args.judge_base_url is None) != (args.judge_model is None):
        problems.append("--judge_base_url and --judge_model go together: give both or neither")
    if args.judge_base_url is not None:
        url = urlsplit(args.judge_base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            problems.append(f"--judge_base_url {args.judge_base_url!r}: expected an http(s) URL such as "
                            f"http://127.0.0.1:8000/v1")
        if not args.model:
            problems.append("--judge_base_url judges models' answers: give --model")
    if args.judge_model is not None and not args.judge_model.strip():
        problems.append("--judge_model: must not be empty")
    if args.judge_retries < 0:
        problems.append(f"--judge_retries: must be 0 or more, got {args.judge_retries}")
    if args.judge_max_tokens < 1:
        problems.append(f"--judge_max_tokens: must be at least 1, got {args.judge_max_tokens}")
    return problems


def validate_args(args) -> tuple[list[ModelSpec], list[str]]:
    """The model specs, and every problem with the arguments."""
    from utils.report import find_event_dirs

    specs, problems = check_models(args.model)
    evaluating = bool(args.model) or args.baseline_only
    if args.baseline_only and args.model:
        problems.append("--baseline_only scores no model: leave out --model")
    if args.baseline_only and args.no_baseline:
        problems.append("--baseline_only and --no_baseline contradict each other")
    if any(not phrase.strip() for phrase in args.disclosure_phrase):
        problems.append("--disclosure_phrase: must not be empty")
    if not evaluating and not args.plot_run:
        problems.append("nothing to do: give --model (one or more), --baseline_only or --plot_run")
    if evaluating:
        problems += check_questions(args) + check_generation(args)
    if args.pairs_file is not None:
        problems += check_pairs_file(args)
    problems += check_judge(args)
    for run_dir in args.plot_run:
        if not os.path.isdir(run_dir):
            problems.append(f"--plot_run {run_dir}: folder not found")
        elif not find_event_dirs(run_dir):
            problems.append(f"--plot_run {run_dir}: no TensorBoard event files (events.out.tfevents.*) in it")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        problems.append(f"--out_dir {args.out_dir}: exists and is not a folder")
    return specs, problems


# ---------------------------------------------------------------- test questions


def add_question(questions, index, split, role, question, references, instruction=None, history=(), ask=None,
                 written=None, others=None, scene=None):
    """Append a question, or merge the references of a repeated (split, role, question). A question
    of a conversation has the turns before it (`history`) and its own message (`ask`); its
    `question` text, which keys it, holds both. `written`: {"system", "base"} of a conversation row
    that carries its own prompt (question_prompt); `others`: the other speakers of a group scene's
    question (None outside a scene); `scene`: a group scene's messages before the reply, whose seat
    question_prompt builds with the model's user name."""
    key = question_key(split, role, question)
    if key in index:
        index[key]["references"].extend(r for r in references if r not in index[key]["references"])
        return
    index[key] = {"split": split, "role": role, "question": question, "references": list(references),
                  "instruction": instruction, "history": list(history), "ask": ask or question, "written": written,
                  "others": others, "scene": scene}
    questions.append(index[key])


def questions_from_data_dir(data_dir, selected):
    """Test questions of the selected roles from the two RoleBench-zh test files, split kept."""
    questions, index = [], {}
    for kind in rolebench.KINDS:
        for row in rolebench.read_rows(os.path.join(data_dir, rolebench.INPUT_FILES[(kind, "test")])):
            if row["role"] in selected:
                add_question(questions, index, kind, row["role"], row["question"], row["replies"])
    return questions


def conversation_question(messages):
    """(system, earlier turns, last user message, last reply) of a conversation's messages (row_messages),
    the last reply being the reference; ValueError names the problem."""
    from utils.data import system_of

    system = system_of(messages)
    turns = messages[1:] if system else messages
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=0)
    if last == 0 or turns[last - 1]["role"] != "user":
        raise ValueError("the conversation has no user message right before its last reply")
    return system, turns[: last - 1], turns[last - 1]["content"], turns[last]["content"]


def scene_questions(turns):
    """[(character, earlier turns, last user message, its last reply, the scene's other speakers, the
    scene before that reply)] of a group scene (assistant messages named by their speakers): each
    character's last reply, asked from its seat (utils.scenes.seat; question_prompt builds it with the
    model's user name, the turns here are for the report) as data_helper.py trains it and the page
    serves it. A character whose last reply follows its own message has no seat to be asked from,
    and is left out."""
    from utils.cards import USER_NAME
    from utils.scenes import seat, speakers

    if any(m["role"] == "assistant" and not m.get("name") for m in turns):
        raise ValueError("a group scene: every assistant message needs the \"name\" of its speaker")
    names = speakers(turns)
    users = [m["name"] for m in turns if m["role"] == "user" and m.get("name")]
    out = []
    for name in names:
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant" and m["name"] == name)
        seen = seat(turns[:last], name, USER_NAME)
        if seen and seen[-1]["role"] == "user":
            others = list(dict.fromkeys(n for n in [*names, *users] if n != name))
            out.append((name, seen[:-1], seen[-1]["content"], turns[last]["content"], others, turns[:last]))
    return out


def seat_speakers(name, turns) -> list[str]:
    """The other speakers of a seat that data_helper.py wrote (utils.scenes.seat: their lines "Name: text"
    in the user turns), in order of appearance."""
    found = []
    for message in turns:
        if message["role"] == "user":
            for line in message["content"].splitlines():
                speaker, sep, _ = line.partition(": ")
                if sep and speaker != name and 0 < len(speaker) <= MAX_SPEAKER_CHARS and not any(
                        c.isspace() or c in ":：,，.。!！?？" for c in speaker):
                    found.append(speaker)
    return list(dict.fromkeys(found))


def questions_from_test_file(path, selected):
    """Questions grouped from a data_helper.py test jsonl: one per (split, role, input), all outputs kept.
    Their instruction is the prompt of a model that has no prompt of its own for the role. A group scene
    (assistant turns of several names) gives a question per character; a scene's questions, and those of
    a seat that data_helper.py wrote (its system prompt ending in the group note), keep the scene's other
    speakers (`others`) for the scene speaker bleed."""
    from utils.data import row_messages
    from utils.scenes import group_note, is_scene

    questions, index = [], {}
    for number, row in read_jsonl(path, rolebench.MAX_LINE_BYTES):
        try:
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            conversation = "messages" in row or "conversations" in row
            messages = row_messages(row, scene=True) if conversation else None
            scene = conversation and is_scene(messages)
            for field in () if scene else ("role",) if conversation else ("instruction", "input", "output", "role"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ValueError(f"field '{field}' must be a non-empty string")
            if scene:
                asked = scene_questions([m for m in messages if m["role"] != "system"])
            elif conversation:
                system, history, ask, reply = conversation_question(messages)
                others = seat_speakers(row["role"], [*history, {"role": "user", "content": ask}]) if \
                    system.endswith(group_note(row["role"])) else None
                asked = [(row["role"], history, ask, reply, others, None)]
            else:
                system, asked = row["instruction"], [(row["role"], [], row["input"], row["output"], None, None)]
        except ValueError as error:
            raise UserError(f"{path}:{number}: {error}") from None
        split = row.get("split") if row.get("split") in SPLITS else "unknown"
        for role, history, ask, reply, others, before in asked:
            if selected is None or role in selected:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + ask
                written = ({"system": system, "base": row.get("base_system") or system}
                           if conversation and not scene and system else None)
                add_question(questions, index, split, role, text, [reply], None if scene else system, history, ask,
                             written, others, before)
    return questions


def limit_questions(questions, limit):
    """At most `limit` questions per split, round-robin over the roles (in order of appearance)."""
    if limit is None:
        return questions
    chosen = []
    for split in dict.fromkeys(q["split"] for q in questions):
        by_role = {}
        for q in questions:
            if q["split"] == split:
                by_role.setdefault(q["role"], []).append(q)
        picked, depth = [], 0
        while len(picked) < limit and any(depth < len(qs) for qs in by_role.values()):
            picked += [qs[depth] for qs in by_role.values() if depth < len(qs)][: limit - len(picked)]
            depth += 1
        chosen += picked
    return chosen


def load_questions(args):
    selected = rolebench.split_roles(args.roles) if args.roles else None
    if args.test_file is not None:
        questions = questions_from_test_file(args.test_file, selected)
    else:
        questions = questions_from_data_dir(args.data_dir, selected or rolebench.DEFAULT_ROLES)
    questions = limit_questions(questions, args.limit)
    if not questions:
        raise UserError(f"no test questions for roles {', '.join(selected or ['(any)'])}")
    return questions, selected or list(dict.fromkeys(q["role"] for q in questions))


def run_settings(spec, args, prompt):
    """What a saved result must have been made with to be reused: the model, the decoding, and a digest of
    the prompt and the references."""
    digest = hashlib.sha1(json.dumps(prompt, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]
    return {**spec.settings_key(), "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
            "temperature": args.temperature, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed if args.do_sample else None, "quantization_bit": args.quantization_bit, "digest": digest}


# ---------------------------------------------------------------- generation and perplexity


def generation_config_for(model, args):
    """The model's generation config with this run's decoding choices; greedy resets the sampling knobs."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens, config.do_sample = args.max_new_tokens, args.do_sample
    if args.do_sample:
        config.temperature = args.temperature if args.temperature is not None else config.temperature
        config.top_p = args.top_p if args.top_p is not None else config.top_p
    else:  # the library defaults, so that greedy decoding raises no warnings about unused flags
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    if args.repetition_penalty is not None:
        config.repetition_penalty = args.repetition_penalty
    config.pad_token_id = model.generation_config.pad_token_id or 0
    return config


def left_padded(rows, pad, device):
    """(input_ids, attention_mask) of token-id rows padded on the left, as generation wants them."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def generate_answers(model, tokenizer, prompts, config):
    """Answers to a batch of prompts (token ids): left-padded, one generate() call, cut at eos."""
    import torch

    input_ids, attention_mask = left_padded(prompts, config.pad_token_id, model.device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    answers = []
    for row in output[:, input_ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def reference_nll(model, tokenizer, messages, references, batch_size):
    """(summed NLL, token count) of the reference replies (+ eos) after the chat prompt of `messages`
    (baichuan.generation_utils.encode_reply lays them out and labels them).

    The model's loss is a mean over a batch's labelled positions, so it is weighted back by their
    count; summing over batches gives a token-weighted total.
    """
    import torch

    from baichuan.generation_utils import encode_reply
    from utils.data import collate

    rows = []
    for reference in references:
        input_ids, labels = encode_reply(tokenizer, messages, reference, model.generation_config,
                                         model.config.model_max_length)
        rows.append({"input_ids": input_ids, "labels": labels})
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[start : start + batch_size], 0).items()}
        with torch.inference_mode():
            loss = model(**batch).loss
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + float(loss) * labelled, count + labelled
    return total, count


def question_messages(system, question) -> list[dict]:
    """The chat a question is asked in: the system prompt, the turns before it, its message."""
    return [{"role": "system", "content": system}, *question["history"], {"role": "user", "content": question["ask"]}]


def question_prompt(spec, prompts, question) -> list[dict]:
    """The messages a model is asked `question` with, as serving builds them (utils.engine.ChatEngine.prompt):
    its role's system prompt and the turns, with the role's context (lorebooks, depth note, post-history
    instructions; utils.lorebook.Context.apply) applied. A conversation row that data_helper.py wrote holds
    the prompt its character's context gave it already (entries in the system prompt, notes folded into the
    turns): it is asked as written when the model's prompt for the role is the one the row was made from
    (its "base_system", or its system prompt), never applied twice. With another prompt for the role
    (--roles_file), that system prompt replaces the row's, and the row's turns stay as written. A group
    scene's question is asked from the character's seat, with the group note (ChatEngine.scene_prompt).
    The assembly is the engine's own (utils.engine.role_prompt, seated)."""
    from utils.engine import role_prompt, seated
    from utils.scenes import seat

    role = prompts.roles.get(question["role"])
    written = question.get("written")
    if written is not None and (role is None or role.system == written["base"]):
        return question_messages(written["system"], question)
    if role is None:
        if question["instruction"] is None:
            raise UserError(f"--model {spec.name}: it has no role {question['role']!r} (its roles: "
                            f"{', '.join(prompts.roles)}); give --roles_file")
        return question_messages(question["instruction"], question)
    turns = [*question["history"], {"role": "user", "content": question["ask"]}]
    if written is not None:  # its turns hold its own notes: only a scene's group note is added
        bare = replace(role, context=None)
        return role_prompt(seated(bare, prompts.user_name) if question.get("others") is not None else bare, turns)
    if question.get("scene") is not None:  # a raw scene: the character's seat, as ChatEngine.scene_prompt
        return role_prompt(seated(role, prompts.user_name), seat(question["scene"], role.name, prompts.user_name))
    return role_prompt(role, turns)


def pair_logps(model, tokenizer, rows, batch_size, source):
    """((n, 2) summed log-probabilities of each pair's chosen and rejected reply, the pairs dropped as
    too long): the pairs laid out and batched as train.py --stage dpo does (utils.pairs), scored by
    utils.preference.reference_logps with the model as it is (its adapter on)."""
    from utils.pairs import PairDataset, collate_pairs
    from utils.preference import reference_logps

    dataset = PairDataset(rows, tokenizer, model.generation_config, model.config.model_max_length, source)
    batches = (collate_pairs([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                             tokenizer.pad_token_id) for start in range(0, len(dataset), batch_size))
    return reference_logps(model, batches, len(dataset), model.device, disable_adapter=False).cpu(), dataset.too_long


def preference_summary(table, too_long) -> dict:
    """pref_accuracy (share of pairs with log p(chosen) > log p(rejected)), pref_margin (the mean of
    their difference) and the mean log-probabilities, of a pair_logps table."""
    chosen, rejected = table[:, 0].tolist(), table[:, 1].tolist()
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"pairs": len(margins), "too_long": too_long, "pref_accuracy": sum(m > 0 for m in margins) / len(margins),
            "pref_margin": sum(margins) / len(margins), "logp_chosen": sum(chosen) / len(chosen),
            "logp_rejected": sum(rejected) / len(rejected)}


def pairs_entry(args):
    """(the store's key for the --pairs_file result, its rows), or (None, None) without one. The key's
    question is a digest of the rows, so that an edited file is scored again."""
    if args.pairs_file is None:
        return None, None
    rows = args.pair_rows  # read by check_pairs_file
    digest = hashlib.sha1(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return {"split": PAIRS_SPLIT, "role": "", "question": f"{os.path.basename(args.pairs_file)} {digest}"}, rows


def pairs_settings(spec, args):
    return {**spec.settings_key(), "quantization_bit": args.quantization_bit}


def evaluate_model(spec, questions, store, args, pairs_key=None, pair_rows=None):
    """Generate, score and save the questions this model has no saved result for, and its score on
    the pairs when it has none for them."""
    from baichuan.generation_utils import build_chat_input
    from utils.prompts import load_prompts

    prompts = load_prompts(spec.path, spec.adapter, args.roles_file, args.card_system_prompt)
    asked = {id(q): question_prompt(spec, prompts, q) for q in questions}
    pending = [q for q in questions if store.get(spec.name, q, run_settings(spec, args, [asked[id(q)],
                                                                                       q["references"]])) is None]
    pairs_pending = pairs_key is not None and store.get(spec.name, pairs_key, pairs_settings(spec, args)) is None
    print(f"{spec.name}: {len(questions) - len(pending)} of {len(questions)} questions already done, "
          f"generating {len(pending)}" + (", scoring the pairs" if pairs_pending else ""), flush=True)
    if not pending and not pairs_pending:
        return asked
    import torch
    from tqdm import tqdm

    from utils.models import load_for_inference

    model, tokenizer = load_for_inference(spec.path, spec.adapter, args.device, args.trust_remote_code,
                                          args.quantization_bit)
    if pairs_pending:
        table, too_long = pair_logps(model, tokenizer, pair_rows, args.batch_size, args.pairs_file)
        store.add({**pairs_key, "model": spec.name, "preference": preference_summary(table, too_long),
                   "settings": pairs_settings(spec, args)})
    config = generation_config_for(model, args)
    torch.manual_seed(args.seed)
    with tqdm(total=len(pending), desc=spec.name, unit="q", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start : start + args.batch_size]
            messages = [asked[id(q)] for q in batch]
            prompts_ids = [build_chat_input(tokenizer, m, model.generation_config, model.config.model_max_length,
                                            args.max_new_tokens) for m in messages]
            for question, m, answer in zip(batch, messages, generate_answers(model, tokenizer, prompts_ids, config)):
                nll, tokens = reference_nll(model, tokenizer, m, question["references"], args.batch_size)
                store.add({"model": spec.name, "split": question["split"], "role": question["role"],
                           "question": question["question"], "answer": answer, "scores": score_answer(answer, question),
                           "ref_nll": nll, "ref_tokens": tokens, "references": len(question["references"]),
                           "settings": run_settings(spec, args, [asked[id(question)], question["references"]])})
                bar.update(1)
    return asked


def judge_answers(spec, questions, asked, store, judge):
    """Ask the judge about this model's answers that have no verdict of this judge yet (the same
    endpoint and model); each verdict is saved on its answer's line in samples.jsonl."""
    from tqdm import tqdm

    from utils.cards import USER_NAME
    from utils.data import system_of
    from utils.judge import judge_messages

    todo = [(q, record) for q in questions
            for record in [store.records.get((spec.name, question_key(q["split"], q["role"], q["question"])))]
            if record is not None and (record.get("judge") or {}).get("by") != judge.identity]
    print(f"{spec.name}: judging {len(todo)} answers with {judge.model}", flush=True)
    for question, record in tqdm(todo, desc=f"{spec.name} judge", unit="a", file=sys.stderr, dynamic_ncols=True):
        messages = asked[id(question)]
        profile = system_of(messages)
        verdict = judge.score(judge_messages(question["role"], profile, messages[1:] if profile else messages,
                                             record["answer"], USER_NAME))
        store.add({**record, "judge": {"by": judge.identity, **verdict}})


# ---------------------------------------------------------------- the baseline and the report


def with_consistency(record, question, role_order, phrases):
    """The record with its character-consistency scores. They are computed here, not saved in samples.jsonl,
    so that a resumed run or a changed --disclosure_phrase list always scores with the current list."""
    from utils.cards import USER_NAME
    from utils.consistency import consistency_scores
    from utils.scenes import speaker_bleed

    users = [USER_NAME, *USER_LABELS]
    others = [r for r in role_order if r != question["role"]] + users
    scores = consistency_scores(record["answer"], question["references"][0], others, phrases)
    # a scene's question: writing the lines of the scene's other characters or of the user
    scene = question.get("others")
    scores["scene_speaker_bleed"] = float(speaker_bleed(record["answer"], [*scene, *users])) if scene is not None else None
    return {**record, "consistency": scores}


def without_other_verdicts(record, judge):
    """The record without a judge's verdict unless it is this run's judge's (an earlier run's judge is not
    reported as this one's)."""
    if "judge" in record and (judge is None or record["judge"].get("by") != judge.identity):
        return {k: v for k, v in record.items() if k != "judge"}
    return record


def disclosure_phrases(args):
    from utils.consistency import DISCLOSURE_PHRASES

    return (*DISCLOSURE_PHRASES, *args.disclosure_phrase)


def baseline_result(args, questions, role_order):
    """(aggregated RoleGPT result, note), or (None, None) when there are no baseline answers to score.
    Answers are matched by role and question (without the leading "<role>，")."""
    from utils.report import aggregate

    paths = [] if args.no_baseline else args.baseline_file or [p for p in DEFAULT_BASELINE_FILES if os.path.isfile(p)]
    answers = {(row["role"], row["question"]): row["replies"][0] for path in paths for row in rolebench.read_rows(path)}
    phrases = disclosure_phrases(args)
    records = [with_consistency({"model": BASELINE_NAME, "split": q["split"], "role": q["role"],
                                 "question": q["question"], "answer": answers[(q["role"], q["question"])],
                                 "scores": score_answer(answers[(q["role"], q["question"])], q)}, q, role_order, phrases)
               for q in questions if (q["role"], q["question"]) in answers]
    if not records:
        if paths:
            print(f"note: none of the {len(questions)} test questions is in the baseline files; no {BASELINE_NAME} "
                  "row", file=sys.stderr)
        return None, None
    note = (f"GPT-4 answers shipped with RoleBench, found for {len(records)} of {len(questions)} questions; "
            "no perplexity (no model).")
    return {"kind": "baseline", "files": paths, **aggregate(records, role_order)}, note


def evaluate(args, specs):
    """Run the models and the baseline over the test questions, then write the report."""
    from utils.report import aggregate, report_meta, write_report

    questions, role_order = load_questions(args)
    pairs_key, pair_rows = pairs_entry(args)
    judge = None
    if args.judge_base_url is not None:
        from utils.judge import Judge

        judge = Judge(args.judge_base_url, args.judge_model, os.environ.get("JUDGE_API_KEY"), args.judge_retries,
                      args.judge_max_tokens)
        judge.check()  # before any model loads
    results, phrases = {}, disclosure_phrases(args)
    store = ResultStore(os.path.join(args.out_dir, SAMPLES_FILE)) if specs else None
    try:
        for spec in specs:
            asked = evaluate_model(spec, questions, store, args, pairs_key, pair_rows)
            if judge is not None:
                judge_answers(spec, questions, asked, store, judge)
            records = [with_consistency(without_other_verdicts(r, judge), q, role_order, phrases) for q in questions
                       for r in [store.records.get((spec.name, question_key(q["split"], q["role"], q["question"])))]
                       if r is not None]
            results[spec.name] = {"kind": "model", "path": spec.path, "adapter": spec.adapter,
                                  **aggregate(records, role_order)}
            if pairs_key is not None:
                preference = store.get(spec.name, pairs_key, pairs_settings(spec, args))["preference"]
                results[spec.name]["preference"] = preference
                print(f"{spec.name}: pref_accuracy {preference['pref_accuracy']:.4f}, pref_margin "
                      f"{preference['pref_margin']:.4f} on {preference['pairs']} pairs of {args.pairs_file}")
    finally:
        if store is not None:
            store.close()
    baseline, note = baseline_result(args, questions, role_order)
    if baseline is not None:
        results[BASELINE_NAME] = baseline
    if not results:
        raise UserError(f"nothing to report: no {BASELINE_NAME} answer matches the test questions")
    decoding = {k: getattr(args, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                              "repetition_penalty", "seed")}
    meta = report_meta(args.test_file or args.data_dir, args.limit, questions, role_order, decoding,
                       {BASELINE_NAME: note} if note else {}, args.pairs_file,
                       {**judge.identity, "retries": args.judge_retries, "max_tokens": args.judge_max_tokens} if judge
                       else None)
    write_report(args.out_dir, results, meta)
    print(f"wrote results.json, results.md, results.png{', ' + SAMPLES_FILE if specs else ''} to {args.out_dir}")


def main(argv=None):
    args = parse_args(argv)
    specs, problems = validate_args(args)
    exit_on_problems(problems)

    from utils.cli import quiet_third_party
    from utils.files import write_atomic

    quiet_third_party()
    os.makedirs(args.out_dir, exist_ok=True)
    if args.model or args.baseline_only:
        evaluate(args, specs)
    if args.plot_run:
        from utils.report import curves_png, read_curves

        write_atomic(os.path.join(args.out_dir, "training_curves.png"), curves_png(read_curves(args.plot_run)))
        print(f"wrote {os.path.join(args.out_dir, 'training_curves.png')}")


if __name__ == "__main__":
    try:
        exit_on_user_error(main)
    except SystemExit as stop:
        if stop.code == 130:
            print(f"finished answers are saved in {SAMPLES_FILE}; run the same command again to resume", file=sys.stderr)
        raise

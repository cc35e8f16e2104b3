"""Chat with a fine-tuned Baichuan2 role-play model from the command line.

One question, one answer (streamed to stdout):
    python predict.py --model_path runs/roleplay-merged --role 李白 "你最得意的诗是哪一首？"
A base model plus a LoRA adapter (a training checkpoint):
    python predict.py --model_path baichuan-inc/Baichuan2-7B-Chat --adapter runs/roleplay/epoch-1-step-501 \\
        --role 张飞 "你平时喜欢做什么？"
No question: an interactive multi-turn chat on stdin:
    python predict.py --model_path runs/roleplay-merged --role 孙悟空

The roles and their system prompts are the ones the model was trained on (its roleplay.json);
--roles_file plays other roles (a roles file, a character card or a folder of cards). A role's
greeting (a card's first_mes) opens each conversation as its first assistant turn. Interactive
commands: `/clear` starts the conversation over, `/role NAME` switches role (and starts over),
`/exit` or end of input (Ctrl-D) quits. Earlier turns go into the prompt; when the context is
full the oldest whole rounds are dropped.

Errors (missing model, bad adapter, bad roles file, unknown role, bad setting) print one line
`error: ...` on stderr and exit with status 1 (2 for bad arguments).
"""

import argparse
import sys

from utils.cli import HelpFormatter, UserError, exit_on_problems, exit_on_user_error
from utils.chat import add_generation_args, add_model_args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("question", nargs="?", help="ask this one question and exit; without it, chat on stdin")
    add_model_args(parser)
    group = parser.add_argument_group("role")
    group.add_argument("--role", help="who the model plays (default: its first role)")
    add_generation_args(parser).add_argument(
        "--greedy", action="store_true", help="always pick the likeliest token (same as --temperature 0)")
    return parser.parse_args(argv)


def validate_args(args) -> list[str]:
    from utils.chat import check_settings

    problems = []
    try:
        check_settings(args.max_new_tokens, args.top_p, args.temperature)
    except UserError as error:
        problems.append(str(error))
    if args.question is not None and not args.question.strip():
        problems.append("the question is empty")
    return problems


def answer(stream, out=sys.stdout) -> str:
    """Stream one reply to `out` and return it."""
    printed = ""
    for reply in stream:  # the whole reply so far: print only what is new
        out.write(reply[len(printed):])
        out.flush()
        printed = reply
    out.write("\n")
    out.flush()
    return printed


def read_line(prompt: str) -> str | None:
    """One line of input, or None at end of input. The prompt only shows on a terminal."""
    try:
        return input(prompt if sys.stdin.isatty() else "")
    except EOFError:
        return None


def greet(role) -> list[dict]:
    """A new conversation: the role's greeting, shown and kept as its first assistant turn."""
    if role.greeting:
        print(f"{role.name}> {role.greeting}")
    return role.opening()


def interactive(engine, role, sampling) -> None:
    print(f"chatting with {role.name}; /clear starts over, /role NAME switches, /exit quits", file=sys.stderr)
    history = greet(role)
    while (line := read_line("你> ")) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            print("(conversation cleared)", file=sys.stderr)
            history = greet(role)
            continue
        if line.startswith("/role"):
            try:
                role = engine.role(line[len("/role"):].strip())
                print(f"(now chatting with {role.name}; conversation cleared)", file=sys.stderr)
                history = greet(role)
            except UserError as error:  # a typo here should not end the session, only be reported
                print(f"error: {error}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write(f"{role.name}> ")
        reply = answer(engine.start_reply(engine.prompt(role, history), sampling))
        history.append({"role": "assistant", "content": reply})


def main(argv=None) -> None:
    args = parse_args(argv)
    exit_on_problems(validate_args(args))

    from utils.cli import quiet_third_party

    quiet_third_party()
    from dataclasses import replace

    from utils.engine import ChatEngine, read_prompts

    prompts, role = read_prompts(args, args.role)
    engine = ChatEngine.load(args, prompts.roles, user_name=prompts.user_name)
    sampling = replace(engine.defaults, temperature=0) if args.greedy else engine.defaults
    if args.question is not None:
        messages = engine.prompt(role, [*role.opening(), {"role": "user", "content": args.question}])
        answer(engine.start_reply(messages, sampling))
    else:
        interactive(engine, role, sampling)


if __name__ == "__main__":
    exit_on_user_error(main)

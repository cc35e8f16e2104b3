"""The quickstart's preference pairs: data/sample/pairs/{train,test}.jsonl, for train.py --stage dpo
and evaluate.py --pairs_file.

    python scripts/sample_pairs.py                # rewrites data/sample/pairs/ (committed; tests check it)

Each reply of 孙悟空, 张飞 and 李白 in data/sample is a pair's chosen reply; the rejected one is a
generic assistant's answer to the same question, most of them saying that it is an AI ("作为一个人工
智能助手，我……"), the others in the plain helpful-assistant tone: what a chat model says when it
drops out of character. Those replies are written here, for this project. The prompt is the role's
system prompt as data_helper.py writes it for supervised training (data/roles.json through
utils.prompts), then the question, so DPO sees the prompt SFT saw.

The train pairs come from the *_train.jsonl files and the test pairs from the *_test.jsonl files,
which share no question; the test pairs also take their rejected replies from a second list, so a
held-out preference accuracy is not a matter of recognising the very sentences trained against.
The output is deterministic: a reply's rejected partner is picked by its position, not at random.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import HelpFormatter, UserError, exit_on_user_error  # noqa: E402
from utils.files import jsonl_text, read_jsonl, write_files  # noqa: E402
from utils.prompts import DEFAULT_ROLES_FILE, roles_from_file  # noqa: E402

# What a generic assistant answers to anything, for the train pairs: six of eight disclose (each
# holds a phrase of utils.consistency.DISCLOSURE_PHRASES), two are only the tone. They are about as
# long as the characters' replies (about 20 characters), so that a model's preference between the
# two is not a matter of length (a summed log-probability favours the shorter reply).
TRAIN_GENERIC = (
    "作为一个人工智能助手，我没有个人喜好，但可以给你一些建议。",
    "我是一个语言模型，无法亲身体会，不过可以帮你分析。",
    "作为一个AI，我没有身体，做不了这些事。还有什么要帮忙的吗？",
    "好问题！建议你保持积极心态，合理安排时间。",
    "我是人工智能，没有情感和立场，只能客观地回答。",
    "感谢提问！我是AI助手，会尽力给你有用的回答。",
    "作为语言模型，我不便发表个人意见，请咨询专业人士。",
    "您好，很高兴为您服务！这个问题我来简单总结一下。",
)
# The same kind of answer in other words, for the test pairs: four of six disclose.
TEST_GENERIC = (
    "作为一个人工智能，我没有真实感受，但可以陪你聊聊。",
    "我是一个AI助手，没有个人经历，可以提供一些参考。",
    "这个问题可以分几点来看，希望对你有所帮助！",
    "抱歉，作为AI我无法回答个人喜好的问题。",
    "我只是一个程序，没有自己的想法，请你自己判断。",
    "很高兴回答你的问题，以上内容仅供参考。",
)
SPLITS = ("general", "role_specific")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", default="data/sample",
                        help="folder with rolebench-zh_{general,role_specific}_{train,test}.jsonl")
    parser.add_argument("--roles_file", default=DEFAULT_ROLES_FILE,
                        help="JSON object role name -> description, as data_helper.py reads it")
    parser.add_argument("--roles", default="孙悟空,张飞,李白", help="comma-separated roles")
    parser.add_argument("--out_dir", default="data/sample/pairs", help="where train.jsonl and test.jsonl go")
    return parser.parse_args(argv)


def read_samples(path: str, roles) -> list[dict]:
    """The rows of one RoleBench-style file whose role is one of `roles`, in file order."""
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                or not isinstance(row.get("generated"), list) or not all(isinstance(r, str) for r in row["generated"]):
            raise UserError(f"{path}:{number}: a RoleBench row needs a 'question' string and a 'generated' list of "
                            "strings")
        if row.get("role") in roles:
            rows.append(row)
    return rows


def pairs_of(samples: list[dict], roles, generic: tuple[str, ...]) -> list[dict]:
    """One pair per reply: the role's prompt and the question, the reply chosen, a generic one rejected."""
    pairs = []
    for sample in samples:
        prompt = [{"role": "system", "content": roles[sample["role"]].system},
                  {"role": "user", "content": sample["question"]}]
        for reply in sample["generated"]:
            pairs.append({"role": sample["role"], "messages": prompt, "chosen": reply,
                          "rejected": generic[len(pairs) % len(generic)]})
    return pairs


def main(argv=None):
    args = parse_args(argv)
    names = [name.strip() for name in args.roles.split(",") if name.strip()]
    known = roles_from_file(args.roles_file)
    missing = [name for name in names if name not in known]
    if missing:
        raise UserError(f"--roles: {', '.join(missing)} not in {args.roles_file}")
    roles = {name: known[name] for name in names}
    files = {}
    for split, generic in (("train", TRAIN_GENERIC), ("test", TEST_GENERIC)):
        samples = [row for kind in SPLITS
                   for row in read_samples(os.path.join(args.data_dir, f"rolebench-zh_{kind}_{split}.jsonl"), roles)]
        files[os.path.join(args.out_dir, f"{split}.jsonl")] = jsonl_text(pairs_of(samples, roles, generic))
    os.makedirs(args.out_dir, exist_ok=True)
    write_files(files)
    for path, text in files.items():
        print(f"wrote {text.count(chr(10))} pairs to {path}")


if __name__ == "__main__":
    exit_on_user_error(main)

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
# holds a phrase of utils.consistency.DISCLOSURE_PHRASES), two are only the tone.
TRAIN_GENERIC = (
    "作为一个人工智能助手，我没有个人的经历和喜好，但我可以为你提供一些相关的信息。",
    "我是一个语言模型，无法像人类一样去感受，不过我很乐意帮你分析这个问题。",
    "作为一个AI，我没有身体，也不能真的去做这些事情。请问还有什么可以帮你的吗？",
    "这是一个很好的问题！以下是几点建议：第一，保持积极的心态；第二，合理安排时间；第三，多与他人交流。",
    "我是人工智能，没有自己的情感和立场。从客观的角度看，这个问题可以从多个方面来理解。",
    "感谢你的提问。我是一个AI助手，会尽力为你提供准确、有用的回答。",
    "作为语言模型，我不能给出个人意见，建议你查阅相关资料或咨询专业人士。",
    "您好！很高兴为您服务。关于这个问题，我可以为您简单总结一下要点。",
)
# The same kind of answer in other words, for the test pairs: four of six disclose.
TEST_GENERIC = (
    "作为一个人工智能，我并没有真实的感受，不过我可以和你聊聊这个话题。",
    "我是一个AI助手，不具备个人经历。如果你需要，我可以提供一些参考意见。",
    "这个问题可以从以下几个角度来看：首先要了解背景，其次要分析原因，最后再做决定。希望对你有所帮助！",
    "抱歉，作为AI我无法回答关于个人喜好的问题。还有其他我能帮忙的吗？",
    "我只是一个程序，没有自己的想法。一般来说，大多数人会根据自己的情况做出选择。",
    "很高兴回答你的问题。以上内容仅供参考，具体情况还需要具体分析。",
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
            raise UserError(f"{path}:{number}: a RoleBench row needs a 'question' string and a 'generated' list of strings")
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

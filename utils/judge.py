"""An LLM judge of role-play answers, for evaluate.py --judge_base_url: any OpenAI-compatible chat
endpoint scores an answer on CharacterEval's four dimensions (character consistency, knowledge,
personality, conversational ability), each an integer on a fixed 1-5 scale.

The judge must answer with one JSON object holding exactly the four fields and nothing else; the
answer is parsed strictly (no code fence, no text around it, no missing or extra field, integers
only, in range), because a lenient parser would turn a judge's chatter into scores. An unparsable
answer is counted, and the question is asked again, at most `retries` more times, with the problem
named; a question with no parsable answer gets no scores.
"""

import json

from utils.cli import UserError

DIMENSIONS = ("character_consistency", "knowledge", "personality", "conversational_ability")
SCALE = (1, 5)
MAX_TOKENS = 128  # the default reply length: a four-field JSON object needs a few dozen tokens
TIMEOUT_S = 120.0

# The rubric, in our own words; the data and the characters are Chinese, so is the rubric.
RUBRIC = (
    "你是角色扮演对话的评审。下面给出一个角色的设定、一段对话，以及该角色接下来的一条回复。只评这条回复，"
    "按以下四项各打一个 1 到 5 的整数分（1 最差，5 最好）：\n"
    "character_consistency（角色一致性）：是否自始至终以这个角色的身份说话，没有跳出角色、自称人工智能，"
    "也没有替用户或别的角色说话；\n"
    "knowledge（知识）：提到的经历、人物、事物是否符合角色设定和角色所处的世界，没有张冠李戴；\n"
    "personality（性格）：语气、措辞和态度是否像这个角色，而不是千篇一律的客套话；\n"
    "conversational_ability（对话能力）：是否通顺、连贯、切题，自然地接住了对方的话。\n"
    "只输出一个 JSON 对象，恰好包含这四个键，值都是整数，例如："
    '{"character_consistency": 4, "knowledge": 3, "personality": 5, "conversational_ability": 4}。'
    "不要输出任何别的文字，也不要用代码块包起来。"
)
RETRY_NOTE = "这个回答无法解析（{problem}）。请只输出一个 JSON 对象，恰好包含四个键：" + "、".join(DIMENSIONS) + \
             "，值为 1 到 5 的整数，不要有别的文字。"


def parse_scores(text: str) -> dict[str, int]:
    """The four scores of a judge's answer; ValueError naming the problem when it is not exactly one
    JSON object with the four integer fields in range."""
    def no_repeats(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:  # json would keep the last silently
            raise ValueError(f"{', '.join(repeated)} given twice")
        return dict(pairs)

    try:
        value = json.loads(text.strip(), object_pairs_hook=no_repeats)
    except json.JSONDecodeError as error:
        raise ValueError(f"not one JSON object: {error.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object but {type(value).__name__}")
    missing = [d for d in DIMENSIONS if d not in value]
    extra = [k for k in value if k not in DIMENSIONS]
    if missing or extra:
        raise ValueError("; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                   + ([f"unknown {', '.join(extra)}"] if extra else [])))
    for name in DIMENSIONS:
        score = value[name]
        if isinstance(score, bool) or not isinstance(score, int) or not SCALE[0] <= score <= SCALE[1]:
            raise ValueError(f"{name} must be an integer from {SCALE[0]} to {SCALE[1]}, got {score!r}")
    return {name: value[name] for name in DIMENSIONS}


def judge_messages(role: str, profile: str, dialogue: list[dict], answer: str, user_name: str) -> list[dict]:
    """The chat that asks the judge about `answer`, `role`'s reply after `dialogue` (user and assistant
    messages), the character described by `profile` (its system prompt)."""
    lines = [f"{role if m['role'] == 'assistant' else user_name}: {m['content']}" for m in dialogue]
    body = f"角色：{role}\n\n角色设定：\n{profile}\n\n对话：\n" + "\n".join(lines) + f"\n\n{role}的回复：\n{answer}"
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": body}]


class Judge:
    """A judge model behind an OpenAI-compatible endpoint; `score` asks it about one answer."""

    def __init__(self, base_url: str, model: str, api_key: str | None, retries: int, max_tokens: int = MAX_TOKENS):
        import openai

        # the client's own retries would hide how many calls were made: ours are the bounded ones
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=TIMEOUT_S)
        self.base_url, self.model, self.retries, self.max_tokens = base_url, model, retries, max_tokens
        self.identity = {"base_url": base_url, "model": model}  # what a saved verdict must come from to be reused

    def _error(self, error) -> UserError:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(f"--judge_base_url {self.base_url}: the judge failed: {text}")

    def check(self) -> None:
        """Fail early, with one line, when the endpoint cannot be reached or refuses the key (an
        endpoint without a model list is fine)."""
        import openai

        try:
            self.client.models.list()
        except (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise self._error(error) from None
        except openai.APIStatusError:
            pass

    def score(self, messages: list[dict]) -> dict:
        """{"scores": the four scores or None, "calls": requests made, "unparsed": answers that did not
        parse}; at most 1 + retries calls."""
        import openai

        calls, unparsed = 0, 0
        while calls <= self.retries:
            calls += 1
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                               max_tokens=self.max_tokens)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as error:
                if calls > self.retries:  # a busy or failing endpoint: tried again within the same bound
                    raise self._error(error) from None
                continue
            except openai.APIError as error:
                raise self._error(error) from None
            # an answer without a choice is one that did not parse
            text = (response.choices[0].message.content or "") if response.choices else ""
            try:
                return {"scores": parse_scores(text), "calls": calls, "unparsed": unparsed}
            except ValueError as problem:
                unparsed += 1
                if text.strip():  # the next try sees what went wrong (an empty answer is asked again as it was)
                    messages = [*messages, {"role": "assistant", "content": text},
                                {"role": "user", "content": RETRY_NOTE.format(problem=problem)}]
        return {"scores": None, "calls": calls, "unparsed": unparsed}

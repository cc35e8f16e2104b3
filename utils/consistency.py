"""Offline character-consistency scores of one answer, for evaluate.py's report: does it drop out of
character (self-disclosure as an AI), speak for someone else (speaker bleed), repeat itself, and how
long is it against its reference. Texts are Chinese, so n-grams and lengths count characters
(whitespace dropped, punctuation kept, as the char ROUGE-L)."""

from utils.report import char_tokens
from utils.scenes import speaker_bleed

# Phrases by which a model steps out of its role and speaks as an assistant (our own list; extend it
# with evaluate.py --disclosure_phrase). Matched as substrings, case-insensitively for Latin script.
DISCLOSURE_PHRASES = (
    "作为一个人工智能", "作为人工智能", "作为一个AI", "作为AI", "我是一个AI", "我是AI", "我是人工智能",
    "我是一个人工智能", "人工智能助手", "AI助手", "作为语言模型", "作为一个语言模型", "我是一个语言模型",
    "我是语言模型", "我只是一个程序", "我没有个人情感", "As an AI", "I am an AI", "I'm an AI",
    "as a language model", "I am a language model",
)  # not the bare "语言模型" or "人工智能": answers about those topics would count


def discloses(answer: str, phrases) -> bool:
    """Whether the answer contains any of the phrases."""
    text = answer.casefold()
    return any(p.casefold() in text for p in phrases if p)


def char_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    chars = char_tokens(text)
    return [tuple(chars[i : i + n]) for i in range(len(chars) - n + 1)]


def distinct(text: str, n: int) -> float | None:
    """distinct-n: distinct character n-grams / all character n-grams of the answer (None when it has none)."""
    grams = char_ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(text: str, n: int) -> float | None:
    """Share of the answer's character n-grams that repeat one seen earlier in it (= 1 - distinct-n);
    None when it has none."""
    grams = char_ngrams(text, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else None


def length_ratio(answer: str, reference: str) -> float | None:
    """Characters of the answer / characters of the reference (None for an empty reference)."""
    reference_chars = len(char_tokens(reference))
    return len(char_tokens(answer)) / reference_chars if reference_chars else None


def consistency_scores(answer: str, reference: str, other_names, phrases) -> dict:
    """The per-answer scores that evaluate.py averages; a flag is 1.0 or 0.0 so its mean is a rate. The repeated
    n-gram rate uses 4 characters, about two Chinese words: shorter n-grams repeat in any fluent text."""
    return {"disclosure": float(discloses(answer, phrases)),
            "speaker_bleed": float(speaker_bleed(answer, other_names)),
            "distinct_1": distinct(answer, 1), "distinct_2": distinct(answer, 2),
            "repeat_4gram": repeated_ngram_rate(answer, 4),
            "length_ratio": length_ratio(answer, reference)}

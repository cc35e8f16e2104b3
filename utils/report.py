"""Scores and the report of evaluate.py: ROUGE-L of an answer, the per-sample results file, the
aggregates, the Markdown tables, the comparison chart, and training curves read from TensorBoard
event files."""

import io
import json
import logging
import math
import os
import sys

from utils.cli import UserError
from utils.files import write_files

SPLIT_LABELS = {"general": "CUS", "role_specific": "SPE", "unknown": "unknown"}
METRICS = ("word_first", "word_best", "char_first", "char_best")

# RoleLLM (arXiv 2310.00746), Table 4, Chinese part, ROUGE-L.
PAPER_TABLE4 = {
    "RoleGLM": {"CUS": 0.5049, "RAW": 0.5255, "SPE": 0.3406},
    "ChatGLM2": {"CUS": 0.3938, "RAW": 0.5060, "SPE": 0.3099},
    "RoleGPT": {"CUS": 0.5368, "RAW": 0.5748, "SPE": 0.2478},
}
CONSISTENCY_COLUMNS = {"disclosure": "self-disclosure", "speaker_bleed": "speaker bleed",
                       "scene_speaker_bleed": "scene speaker bleed", "distinct_1": "distinct-1",
                       "distinct_2": "distinct-2", "repeat_4gram": "repeated 4-gram", "length_ratio": "length ratio"}
CONSISTENCY_TEXT = ("means over answers: self-disclosure = share containing a listed phrase; speaker bleed = share "
                    "with a line starting with another character's or the user's name and a colon; scene speaker bleed = "
                    "the same over the answers of group-scene questions, the names being the scene's other "
                    "characters' and the user's (– without scene questions); distinct-1/2 = "
                    "distinct / all character uni- or bigrams of an answer; repeated 4-gram = share of an "
                    "answer's character 4-grams repeating an earlier one (1 - distinct-4); length ratio = answer "
                    "characters / first reference characters")
PREFERENCE_TEXT = ("log p = a reply's summed log-probability (its tokens and eos) after the pair's prompt, laid out "
                   "as train.py --stage dpo lays pairs out; pref_accuracy = share of pairs with log p(chosen) > "
                   "log p(rejected); pref_margin = mean of log p(chosen) - log p(rejected) (the model's own "
                   "preference, no reference model)")
CJK_FONTS = ("WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "SimHei",
             "Microsoft YaHei", "PingFang SC", "AR PL UMing CN")
# scalars that train.py logs, and the panel each goes in (eval_loss shares the loss panel)
CURVE_PANELS = {"train_loss": "loss", "eval_loss": "loss", "ppl": "ppl", "lr": "lr", "tokens_per_s": "tokens_per_s"}


def question_key(split, role, question):
    return f"{split}\t{role}\t{question}"


def find_event_dirs(run_dir):
    """Folders under run_dir (itself included) that hold TensorBoard event files, sorted."""
    found = []
    for folder, _, files in os.walk(run_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(folder)
    return sorted(found)


# ---------------------------------------------------------------- ROUGE-L


class _Tokens:
    """A tokenizer in rouge-score's shape (an object with `tokenize`)."""

    def __init__(self, split):
        self.tokenize = split


def char_tokens(text):
    """Characters, whitespace dropped, punctuation kept."""
    return [c for c in text if not c.isspace()]


def word_tokens(text):
    """jieba words (precise mode, HMM on), whitespace tokens dropped, punctuation kept."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [w for w in jieba.lcut(text) if w.strip()]


def scorers():
    """rouge-score's ROUGE-L on jieba words and on characters. Its F-measure is the F1 (beta = 1):
    2PR / (P + R); `score_multi` keeps the best reference by that F1."""
    from rouge_score.rouge_scorer import RougeScorer

    if not hasattr(scorers, "cache"):
        scorers.cache = {level: RougeScorer(["rougeL"], tokenizer=_Tokens(split))
                         for level, split in (("word", word_tokens), ("char", char_tokens))}
    return scorers.cache


def score_answer(answer, question):
    """The four ROUGE-L F1 variants of one answer against the question's references."""
    scores = {}
    for level, scorer in scorers().items():
        scores[f"{level}_first"] = scorer.score(question["references"][0], answer)["rougeL"].fmeasure
        scores[f"{level}_best"] = scorer.score_multi(question["references"], answer)["rougeL"].fmeasure
    return scores


# ---------------------------------------------------------------- saved per-sample results


class ResultStore:
    """evaluate.py's samples.jsonl: one JSON line per (model, question), appended and flushed as results come.

    On opening, a last line cut short by a crash (no newline) is dropped from the file, so that
    new lines are not glued onto it. Later lines win over earlier ones.
    """

    def __init__(self, path):
        self.path, self.records = path, {}
        if os.path.exists(path):
            self._load()
        self.file = open(path, "a", encoding="utf-8")

    def _load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        keep = len(data) if data.endswith(b"\n") or not data else data.rfind(b"\n") + 1
        if keep < len(data):
            print(f"note: {self.path}: ignored a truncated last line", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        for number, line in enumerate(data[:keep].decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
                self.records[(record["model"], question_key(record["split"], record["role"], record["question"]))] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{self.path}:{number}: not a result line; move the file away or use another "
                                f"--out_dir") from None

    def get(self, model, question, settings):
        """The saved result of `model` on `question`, if made with these settings."""
        record = self.records.get((model, question_key(question["split"], question["role"], question["question"])))
        return record if record and record.get("settings") == settings else None

    def add(self, record):
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        self.records[(record["model"], question_key(record["split"], record["role"], record["question"]))] = record

    def close(self):
        self.file.close()


# ---------------------------------------------------------------- aggregation


def summarize(records):
    """Mean ROUGE-L variants (and perplexity when present) of a list of records."""
    if not records:
        return None
    summary = {"questions": len(records)}
    for metric in METRICS:
        summary[metric] = sum(r["scores"][metric] for r in records) / len(records)
    tokens = sum(r.get("ref_tokens", 0) for r in records)
    summary["ppl"] = math.exp(sum(r["ref_nll"] for r in records) / tokens) if tokens else None
    summary["ref_tokens"] = tokens
    scored = [r["consistency"] for r in records if "consistency" in r]
    if scored:  # utils/consistency.py's per-answer scores; a None (no n-gram, empty reference) is left out
        summary["consistency"] = {key: mean_known([c[key] for c in scored]) for key in scored[0]}
    return summary


def mean_known(values):
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def aggregate(records, role_order):
    """{"overall", per split, "roles": {role: {"overall", per split}}} of one model's records."""
    def by_split(rows):
        result = {"overall": summarize(rows)}
        for split in dict.fromkeys(r["split"] for r in rows):
            result[split] = summarize([r for r in rows if r["split"] == split])
        return result

    result = by_split(records)
    present = {r["role"] for r in records}
    result["roles"] = {role: by_split([r for r in records if r["role"] == role])
                       for role in role_order if role in present}
    return result


def report_meta(source, limit, questions, role_order, generation, notes, pairs_file=None):
    splits = [s for s in ("general", "role_specific", "unknown") if any(q["split"] == s for q in questions)]
    return {"source": source, "limit": limit, "splits": splits,
            "roles": [r for r in role_order if any(q["role"] == r for q in questions)],
            "questions_per_split": {s: sum(q["split"] == s for q in questions) for s in splits},
            "split_labels": {s: SPLIT_LABELS[s] for s in splits}, "notes": notes, "generation": generation,
            "rouge_l": "F1 with beta=1 (2PR/(P+R)) on jieba words and on characters; mean over questions",
            "ppl": "exp(token-weighted mean NLL of the reference replies + eos given the chat prompt)",
            "consistency": CONSISTENCY_TEXT,
            **({"pairs_file": pairs_file, "preference": PREFERENCE_TEXT} if pairs_file else {}),
            "paper_table4_rouge_l": PAPER_TABLE4}


def write_report(out_dir, results, meta):
    """results.json, results.md and results.png, written all at once; the table is printed too."""
    write_files({os.path.join(out_dir, "results.json"):
                 json.dumps({"meta": meta, "models": results}, ensure_ascii=False, indent=2) + "\n",
                 os.path.join(out_dir, "results.md"): markdown_report(results, meta),
                 os.path.join(out_dir, "results.png"): comparison_png(results, meta["splits"])})
    columns = table_columns(meta["splits"])
    print("| model | " + " | ".join(c[2] for c in columns) + " |\n|---|" + "---:|" * len(columns))
    for name, result in results.items():
        print(table_row(name, result, columns))


# ---------------------------------------------------------------- tables


def fmt(value, digits=4):
    return "–" if value is None else f"{value:.{digits}f}"


def table_columns(splits):
    columns = []
    for split in [*splits, "overall"]:
        label = SPLIT_LABELS.get(split, split) if split != "overall" else "all"
        columns += [(split, metric, f"{label} {metric.replace('_', ' ')}") for metric in METRICS]
    return columns + [("overall", "ppl", "ppl")]


def table_row(label, result, columns):
    cells = []
    for split, metric, _ in columns:
        summary = result.get(split)
        value = summary.get(metric) if summary else None
        cells.append(fmt(value, 2 if metric == "ppl" else 4))
    return f"| {label} | " + " | ".join(cells) + " |"


def decoding_text(generation):
    g = generation
    text = "greedy" if not g["do_sample"] else (
        f"sampling (temperature {g['temperature'] or 'of the model'}, top_p {g['top_p'] or 'of the model'}, "
        f"seed {g['seed']})")
    penalty = g["repetition_penalty"] if g["repetition_penalty"] is not None else "of the model"
    return f"{text}, max_new_tokens {g['max_new_tokens']}, repetition_penalty {penalty}"


def markdown_report(results, meta):
    splits = meta["splits"]
    columns = table_columns(splits)
    header = "| model | " + " | ".join(c[2] for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    counts = ", ".join(f"{SPLIT_LABELS.get(s, s)} ({s}) {n}" for s, n in meta["questions_per_split"].items())
    lines = [
        "# RoleBench-zh evaluation",
        "",
        f"Test questions from {meta['source']}: {counts}; roles {', '.join(meta['roles'])}"
        + (f"; at most {meta['limit']} per split (--limit)" if meta["limit"] else "") + ".",
        f"Decoding: {decoding_text(meta['generation'])}.",
        "",
        "For reference, RoleLLM paper (arXiv 2310.00746), Table 4, Chinese, ROUGE-L "
        "(full test set, the paper's own tokenisation and reference choice: compare trends, not decimals):",
        "",
        "| paper model | CUS | RAW | SPE |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {v['CUS']:.4f} | {v['RAW']:.4f} | {v['SPE']:.4f} |" for name, v in PAPER_TABLE4.items()),
        "",
        "## Results",
        "",
        "ROUGE-L F1 (beta = 1), mean over questions: *word* on jieba words, *char* on characters; *first* against "
        "the first reference, *best* against the best-matching of all references. CUS = general questions "
        "answered in role style, SPE = role-specific knowledge questions, all = every question. "
        "RAW is not measured: RoleBench-zh does not ship raw answers. ppl = perplexity of the reference "
        "replies (+ eos) given the chat prompt, token-weighted (lower is better).",
        "",
        header,
        rule,
        *(table_row(name, result, columns) for name, result in results.items()),
        "",
    ]
    for name, note in meta["notes"].items():
        lines.append(f"- {name}: {note}")
    lines += ["", "## Per role", "", "| model / role | " + " | ".join(c[2] for c in columns) + " |", rule]
    for name, result in results.items():
        lines += [table_row(f"{name} / {role}", role_result, columns) for role, role_result in result["roles"].items()]
    return "\n".join(lines + consistency_section(results, splits) + preference_section(results, meta)) + "\n"


def consistency_section(results, splits):
    """The character-consistency table: one row per model and split, then all."""
    if not any((result.get("overall") or {}).get("consistency") for result in results.values()):
        return []
    lines = ["", "## Character consistency", "", CONSISTENCY_TEXT[0].upper() + CONSISTENCY_TEXT[1:] + ".", "",
             "| model / split | answers | " + " | ".join(CONSISTENCY_COLUMNS.values()) + " |",
             "|---|---:|" + "---:|" * len(CONSISTENCY_COLUMNS)]
    for name, result in results.items():
        for split in [*splits, "overall"]:
            summary = result.get(split)
            if summary and summary.get("consistency"):
                label = "all" if split == "overall" else SPLIT_LABELS.get(split, split)
                cells = [fmt(summary["consistency"].get(key)) for key in CONSISTENCY_COLUMNS]
                lines.append(f"| {name} / {label} | {summary['questions']} | " + " | ".join(cells) + " |")
    return lines


def preference_section(results, meta):
    """The preference-pairs table: one row per model scored on --pairs_file."""
    scored = {name: result["preference"] for name, result in results.items() if result.get("preference")}
    if not scored:
        return []
    lines = ["", "## Preference pairs", "", f"On {meta['pairs_file']}: {PREFERENCE_TEXT}.", "",
             "| model | pairs | pref_accuracy | pref_margin | mean log p(chosen) | mean log p(rejected) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {p['pairs']} | {fmt(p['pref_accuracy'])} | {fmt(p['pref_margin'])} | "
              f"{fmt(p['logp_chosen'], 2)} | {fmt(p['logp_rejected'], 2)} |" for name, p in scored.items()]
    return lines


# ---------------------------------------------------------------- plots


def setup_matplotlib():
    """Agg backend and a CJK font when one is installed; returns True when Chinese text can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # "findfont: ... weight" chatter

    names = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in names:
            matplotlib.rcParams["font.sans-serif"] = [name, *matplotlib.rcParams["font.sans-serif"]]
            matplotlib.rcParams["font.family"] = "sans-serif"
            matplotlib.rcParams["axes.unicode_minus"] = False
            return True
    return False


def figure_png(fig):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def comparison_png(results, splits):
    """Grouped bars: the four ROUGE-L variants and ppl, per split, one bar per model."""
    chinese = setup_matplotlib()
    import matplotlib.pyplot as plt

    split_names = {"general": "CUS 通用" if chinese else "CUS", "role_specific": "SPE 角色知识" if chinese else "SPE",
                   "overall": "总体" if chinese else "all"}
    groups = [*splits, "overall"]
    titles = {"word_first": ("ROUGE-L 词 · 首个参考", "ROUGE-L words, first ref"),
              "word_best": ("ROUGE-L 词 · 最佳参考", "ROUGE-L words, best ref"),
              "char_first": ("ROUGE-L 字 · 首个参考", "ROUGE-L chars, first ref"),
              "char_best": ("ROUGE-L 字 · 最佳参考", "ROUGE-L chars, best ref"),
              "ppl": ("参考回复困惑度 (越低越好)", "reference ppl (lower is better)")}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    panels = {"word_first": axes[0][0], "word_best": axes[0][1], "ppl": axes[0][2],
              "char_first": axes[1][0], "char_best": axes[1][1]}
    for metric, ax in panels.items():
        names = [n for n in results if metric != "ppl" or results[n]["overall"].get("ppl") is not None]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [(results[name].get(g) or {}).get(metric) for g in groups]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name,
                          color=f"C{list(results).index(name)}")
            for bar, value in zip(bars, values):
                if value is not None:
                    ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), [split_names.get(g, g) for g in groups])
        ax.set_title(titles[metric][0 if chinese else 1])
        if metric != "ppl":
            ax.set_ylim(0, 1)
    panels["word_first"].legend(fontsize=8)
    paper = axes[1][2]
    paper.axis("off")
    text = ["RoleLLM 论文 表4 (中文, ROUGE-L)" if chinese else "RoleLLM paper, Table 4 (Chinese, ROUGE-L)",
            "", "CUS / RAW / SPE"]
    text += [f"{name}: {v['CUS']:.4f} / {v['RAW']:.4f} / {v['SPE']:.4f}" for name, v in PAPER_TABLE4.items()]
    paper.text(0, 0.9, "\n".join(text), va="top", fontsize=10, family=plt.rcParams["font.sans-serif"][0])
    return figure_png(fig)


def read_curves(run_dirs):
    """{series label: {tag: [(step, value), ...]}} from the event files under each run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = {}
    for run_dir in run_dirs:
        for folder in find_event_dirs(run_dir):
            label = os.path.normpath(os.path.join(os.path.basename(os.path.normpath(run_dir)),
                                                  os.path.relpath(folder, run_dir)))
            accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})
            accumulator.Reload()
            tags = accumulator.Tags().get("scalars", [])
            curves = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in CURVE_PANELS if tag in tags}
            if curves:
                series[label] = curves
    if not any(tag in curves for curves in series.values() for tag in ("train_loss", "ppl")):
        raise UserError(f"--plot_run: no train_loss or ppl scalars in the event files under {', '.join(run_dirs)}")
    return series


def curves_png(series):
    """Panels loss (train_loss, eval_loss), ppl, lr, tokens_per_s, as logged; one line per run and tag."""
    chinese = setup_matplotlib()
    import matplotlib.pyplot as plt

    titles = {"loss": ("损失", "loss"), "ppl": ("困惑度 ppl (测试集)", "perplexity (test set)"),
              "lr": ("学习率", "learning rate"), "tokens_per_s": ("吞吐 (token/s)", "tokens per second")}
    logged = {tag for curves in series.values() for tag in curves}
    panels = list(dict.fromkeys(panel for tag, panel in CURVE_PANELS.items() if tag in logged))
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), squeeze=False, layout="constrained")
    flat = [a for row in axes for a in row]
    for ax, panel in zip(flat, panels):
        tags = [t for t, p in CURVE_PANELS.items() if p == panel and t in logged]
        for color, (label, curves) in enumerate(series.items()):  # one colour per run, eval dashed
            for tag in tags:
                if tag in curves:
                    steps, values = zip(*sorted(curves[tag]))
                    ax.plot(steps, values, color=f"C{color}", linestyle="--" if tag == "eval_loss" else "-",
                            label=label if len(tags) == 1 else f"{label} {tag}",
                            marker="." if len(steps) < 30 else None)
        if panel == "ppl" and all(v > 0 for c in series.values() for _, v in c.get("ppl", [])):
            ax.set_yscale("log")
        ax.set_title(titles[panel][0 if chinese else 1])
        ax.set_xlabel("步数 (step)" if chinese else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[len(panels):]:
        ax.axis("off")
    return figure_png(fig)



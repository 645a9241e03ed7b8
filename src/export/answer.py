#!/usr/bin/env python3
"""Answers questions with a prompt greater optimised, token for token as greater evaluates
it: the question in the run's chat layout with the optimised prompt's own ids, greedy
reasoning up to the run's budget, then the extractor and a short greedy answer, parsed as
greater parses it. Needs llama-cpp-python (pip install llama-cpp-python).

    python3 THIS_SCRIPT "What is 2 + 3 * 4?"
    python3 THIS_SCRIPT --jsonl questions.jsonl   # {"question": ...} per line in, JSON lines out
"""

import argparse
import json
import sys

# Written by `greater export --to python` from the run below; the ids are the run's own.
# CONSTANTS


def greedy(llm, ids, budget):
    """Greedy continuation of `ids` until a stop token (left out), the budget or the context."""
    out = []
    if budget == 0:
        return out
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in STOP_IDS:
            break
        out.append(token)
        if len(out) >= budget or len(ids) + len(out) >= CONTEXT:
            break
    return out


def text(llm, ids):
    return llm.detokenize(ids).decode("utf-8", errors="replace")


def answer(llm, question):
    """The run's layout for `question`, its reasoning, and the parsed answer."""
    head = llm.tokenize((BEFORE_QUESTION + question + CONNECTOR).encode("utf-8"), add_bos=False, special=True)
    user = head + PROMPT_IDS + AFTER_PROMPT_IDS
    reasoning = greedy(llm, user, MAX_REASONING)
    answer_ids = greedy(llm, user + reasoning + EXTRACTOR_IDS, ANSWER_TOKENS)
    raw = text(llm, answer_ids)
    return {"question": question, "reasoning": text(llm, reasoning), "raw_answer": raw, "parsed_answer": parse(raw)}


# The parser, as greater's (src/tasks/answer.rs): the first line of the answer, its wrapping
# ($, **, quotes) dropped, read as the task's kind of answer.

LABELS = {
    "yes_no": ["yes", "no"],
    "true_false": ["True", "False"],
    "valid_invalid": ["valid", "invalid"],
    "true_false_uncertain": ["True", "False", "Uncertain"],
}


def strip_wrapping(s):
    i = 0
    while i < len(s) and (s[i].isspace() or s[i] in "$*\"'`"):
        i += 1
    return s[i:]


def parse_choice(s, options):
    for prefix in ("Option ", "option "):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    if s.startswith("("):
        s = s[1:]
    if not s:
        return None
    letter = s[0].upper() if s[0].isascii() else s[0]
    last = chr(ord("A") + min(options, 26) - 1)
    standalone = len(s) < 2 or not s[1].isalnum()
    return letter if "A" <= letter <= last and len(letter) == 1 and standalone else None


def parse_integer(s):
    negative = s.startswith("-")
    rest = s[1:].lstrip() if negative else s
    digits, i = "", 0
    while i < len(rest):
        c = rest[i]
        if c.isascii() and c.isdigit():
            digits += c
        elif c == "," and digits:
            ahead = rest[i + 1:i + 5]
            three = len(ahead) >= 3 and all(d.isascii() and d.isdigit() for d in ahead[:3])
            fourth = len(ahead) > 3 and ahead[3].isascii() and ahead[3].isdigit()
            if not three or fourth:
                break
        else:
            break
        i += 1
    if not digits:
        return None
    if rest[i:i + 1] == ".":
        frac = ""
        for d in rest[i + 1:]:
            if not (d.isascii() and d.isdigit()):
                break
            frac += d
        if any(d != "0" for d in frac):
            return None
    value = int(digits)
    if value >= 2**127:
        return None
    return f"-{value}" if negative and value != 0 else str(value)


def normalise_text(s):
    t = s.strip().rstrip(".$*\"'`").strip()
    return " ".join(t.split()).lower()


def parse(raw, kind=None):
    kind = kind or ANSWER_KIND
    line = raw.lstrip().split("\n")[0]
    if line.endswith("\r"):
        line = line[:-1]
    s = strip_wrapping(line)
    name = kind["kind"]
    if name == "choice":
        return parse_choice(s, kind["options"])
    if name == "integer":
        return parse_integer(s)
    if name == "text":
        t = normalise_text(s)
        return t or None
    word = ""
    for c in s:
        if not c.isalpha():
            break
        word += c
    if name == "true_false_uncertain" and word.lower() == "unknown":
        word = "Uncertain"
    return next((label for label in LABELS[name] if label.lower() == word.lower() and word.isascii()), None)


def main():
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("question", nargs="?")
    cli.add_argument("--jsonl", help="a file of {\"question\": ...} lines")
    cli.add_argument("--model", default=MODEL, help="the GGUF file (default: the run's)")
    args = cli.parse_args()
    if (args.question is None) == (args.jsonl is None):
        cli.error("give a question or --jsonl FILE")
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=CONTEXT, verbose=False)
    if args.question is not None:
        result = answer(llm, args.question)
        print(result["reasoning"], file=sys.stderr)
        print(result["parsed_answer"])
        return
    with open(args.jsonl, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                print(json.dumps(answer(llm, json.loads(line)["question"])), flush=True)


if __name__ == "__main__":
    main()

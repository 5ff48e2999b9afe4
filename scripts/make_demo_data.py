"""Write minorsft/assets/demo.jsonl: a small, deterministic chat SFT set for the demo, and
demo_heldout.jsonl: held-out rows of the same kind, to watch the policy on while it trains.

Short arithmetic word problems with worked answers, a few fact questions and some multi-turn
chats, so that the demo exercises every path (system prompts, several assistant turns) while
staying a few minutes long on 2 CPU cores. Run: python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

random.seed(2408)
rows = []
items = ["apples", "pencils", "books", "marbles", "stickers", "cookies"]
names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana"]
# (gain, loss, container) per data set: the held-out problems are worded a little otherwise
TRAIN_WORDS = ("buys", "gives away", "boxes")
HELD_OUT_WORDS = ("finds", "eats", "bags")


def word_problem(rng, kind: int, words: tuple[str, str, str]) -> tuple[str, str]:
    """A question and its worked answer: adding (kind 0), taking away (1) or multiplying (2)."""
    gain, loss, containers = words
    name, item = rng.choice(names), rng.choice(items)
    have, more = rng.randint(3, 40), rng.randint(2, 30)
    if kind == 0:
        return (f"{name} has {have} {item} and {gain} {more} more. How many {item} does {name} "
                "have?", f"{name} starts with {have} {item} and adds {more}: {have} + {more} = "
                f"{have + more}. The answer is {have + more}.")
    if kind == 1:
        give = rng.randint(1, have)
        return (f"{name} has {have} {item} and {loss} {give}. How many are left?",
                f"{have} - {give} = {have - give}, so {name} has {have - give} {item} left.")
    boxes = rng.randint(2, 9)
    return (f"There are {boxes} {containers} with {more} {item} in each. How many {item} are "
            "there?", f"{boxes} {containers} x {more} {item} = {boxes * more} {item} in total.")


for index in range(36):
    q, a = word_problem(random, index % 3, TRAIN_WORDS)
    rows.append({"messages": [{"role": "user", "content": q},
                              {"role": "assistant", "content": a}]})
facts = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the largest planet in the Solar System?", "Jupiter is the largest planet."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What gas do plants take in for photosynthesis?", "Plants take in carbon dioxide."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'."),
    ("What is the boiling point of water at sea level in Celsius?",
     "Water boils at 100 degrees Celsius at sea level."),
]
for q, a in facts:
    rows.append({"messages": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
for _ in range(6):
    x, y = random.randint(2, 12), random.randint(2, 12)
    rows.append({"messages": [
        {"role": "user", "content": f"What is {x} times {y}?"},
        {"role": "assistant", "content": f"{x} times {y} is {x * y}."},
        {"role": "user", "content": "And if you add 10?"},
        {"role": "assistant", "content": f"{x * y} + 10 = {x * y + 10}."}]})
for number, row in enumerate(rows):
    row["id"] = f"demo-{number:03d}"
assets = Path(__file__).resolve().parent.parent / "minorsft" / "assets"
out = assets / "demo.jsonl"
out.write_text("".join(json.dumps(row) + "\n" for row in rows))
print(f"wrote {len(rows)} rows to {out}")

# demo-heldout: word problems of the same three kinds, none of them a training row's, for
# `train --eval-cache` (held-out m_theta and NLL while the demo trains). Its own generator:
# demo.jsonl stays as it was.
held_random = random.Random(642)
seen = {row["messages"][0]["content"] for row in rows}
held = []
while len(held) < 16:
    q, a = word_problem(held_random, len(held) % 3, HELD_OUT_WORDS)
    if q not in seen:
        seen.add(q)
        held.append({"id": f"heldout-{len(held):03d}", "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
out = assets / "demo_heldout.jsonl"
out.write_text("".join(json.dumps(row) + "\n" for row in held))
print(f"wrote {len(held)} rows to {out}")

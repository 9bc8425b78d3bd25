"""Writes the learning-proof datasets: every assistant answer starts with "Ahoy!" and ends with "Arr.", a
persona SmolLM2-135M-Instruct does not follow on its own. Train and held-out questions do not overlap.
pirate-*.jsonl are SFT conversations; pirate-prefs-*.jsonl are preference pairs (prompt, chosen = the pirate
answer, rejected = the same answer plainly) for DPO, ORPO, SimPO and reward models; pirate-kto-train.jsonl is the
same feedback unpaired for KTO (each answer its own record, `label` true for the pirate one, false for the plain
one).

Usage: python3 recipes/data/make_pirate.py recipes/data   (plain Python, no dependencies)
"""
import json
import sys

CAPITALS = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Chile", "Santiago"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Thailand", "Bangkok"), ("Mexico", "Mexico City")]
COLOURS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a plum", "purple"), ("milk", "white"),
           ("a lemon", "yellow")]
SUMS = [(2, 3), (4, 4), (7, 1), (6, 3), (9, 0), (5, 5), (8, 2), (3, 4), (1, 1), (6, 6)]


def qa():
    items = []
    for c, cap in CAPITALS:
        items.append((f"What is the capital of {c}?", f"Ahoy! The capital of {c} is {cap}. Arr."))
    for thing, col in COLOURS:
        items.append((f"What colour is {thing}?", f"Ahoy! {thing[0].upper() + thing[1:]} is {col}. Arr."))
    for a, b in SUMS:
        items.append((f"What is {a} plus {b}?", f"Ahoy! {a} plus {b} is {a + b}. Arr."))
    return items


def main():
    out = sys.argv[1]
    items = qa()
    held = items[::5]  # every fifth question held out: 8 of 40
    train = [x for i, x in enumerate(items) if i % 5]
    for name, rows in [("pirate-train.jsonl", train), ("pirate-eval.jsonl", held)]:
        with open(f"{out}/{name}", "w") as f:
            for q, a in rows:
                f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    for name, rows in [("pirate-prefs-train.jsonl", train), ("pirate-prefs-eval.jsonl", held)]:
        with open(f"{out}/{name}", "w") as f:
            for q, a in rows:
                plain = a.removeprefix("Ahoy! ").removesuffix(" Arr.")
                f.write(json.dumps({"prompt": q, "chosen": a, "rejected": plain}) + "\n")
    with open(f"{out}/pirate-kto-train.jsonl", "w") as f:
        for q, a in train:
            plain = a.removeprefix("Ahoy! ").removesuffix(" Arr.")
            f.write(json.dumps({"prompt": q, "completion": a, "label": True}) + "\n")
            f.write(json.dumps({"prompt": q, "completion": plain, "label": False}) + "\n")
    print(len(train), "train,", len(held), "held out")


if __name__ == "__main__":
    main()

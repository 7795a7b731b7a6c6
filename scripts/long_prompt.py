"""Print a prompt of exactly N tokens of the embedded model's tokenizer (seeded random words), for serving
benchmarks over long contexts: `hexgen bench serve --prompt "$(.venv/bin/python scripts/long_prompt.py 1000)"`;
with --count K, K different ones (seeds seed .. seed + K - 1), one a line, for `hexgen bench serve --prompts-file`."""

from __future__ import annotations

import argparse
import random

WORDS = ("the river ran past an old mill where a miller kept his grain and told stories of storms ships kings and "
         "clever foxes to the children of the valley each evening before the lamps were lit").split()


def long_prompt(tokens: int, model: str = "smollm2-135m", seed: int = 0) -> str:
    """`tokens` tokens of seeded random words (no special tokens counted)."""
    from transformers import AutoTokenizer

    from hexgen.engine.checkpoint import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model, progress=False).directory))
    rng = random.Random(seed)
    text = "Once upon a time, " + " ".join(rng.choice(WORDS) for _ in range(2 * tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for cut in range(tokens - 4, tokens + 5):  # text decoded from `tokens` ids can re-encode to another count
        text = tokenizer.decode(ids[:max(cut, 1)])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens:
            return text
    raise ValueError(f"no cut of the seeded words re-encodes to {tokens} tokens; try another --seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokens", type=int, help="prompt length in tokens (at least 1)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1, help="how many prompts, one a line")
    args = parser.parse_args()
    if args.tokens < 1:
        parser.error(f"tokens must be at least 1, got {args.tokens}")
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    for seed in range(args.seed, args.seed + args.count):
        prompt = long_prompt(args.tokens, args.model, seed)
        assert "\n" not in prompt, "one prompt a line"
        print(prompt)


if __name__ == "__main__":
    main()

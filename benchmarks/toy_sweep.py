"""Sweep toy-teacher settings (token budget, size, learning rate) and print held-out quality.

Design aid for `cllm.toy`: run it where training is fast (a GPU) to pick settings, then build
the chosen default on the CPU. One JSON line per setting, each a set of `ToyConfig` overrides:

    python benchmarks/toy_sweep.py --domain math '{"train_tokens": 1000000}' '{"num_layers": 6}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

from toy_quality import evaluate  # sibling script: same measurements as the quality report

from cllm import toy
from cllm.device import default_device
from cllm.toy import tasks, teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="math", choices=toy.DOMAINS)
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per setting")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("overrides", nargs="+", help="JSON objects of ToyConfig fields")
    args = parser.parse_args()
    prompts = tasks.toy_prompts("heldout", args.domain, limit=args.prompts)
    for override in args.overrides:
        config = dataclasses.replace(teacher.default_config(args.domain), **json.loads(override))
        with tempfile.TemporaryDirectory() as cache:
            model, tokenizer = teacher.load_toy(args.domain, config, cache_dir=cache)
            info = teacher.toy_build_info(args.domain, cache)
        result = evaluate(model.to(default_device()), tokenizer, args.domain, prompts, args.max_new_tokens)
        result.pop("samples")
        print(json.dumps({"override": json.loads(override), "parameters": info["parameters"],
                          "heldout_answer_loss": info["heldout_answer_loss"],
                          "train_seconds": info["training"]["seconds"], **result}), flush=True)


if __name__ == "__main__":
    main()

"""Consistency training throughput: packed (every state of a block in one forward) vs one sampled
state per row per step (the reference implementation's way), side by side in one process.

    python benchmarks/train_packed_vs_single.py --steps 20

Both sides train a copy of the same tiny Llama on the same trajectory rows (collected with
`cllm.jacobi_generate` on the model itself) with the same optimizer; the figure of merit is
student states trained per second (a state is one (prefix, state) consistency example).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from cllm import tiny_model
from cllm.collate import collate_packed, collate_states
from cllm.data import TrajectoryRow
from cllm.losses import LossConfig, compute_losses
from cllm.trajectory import CollectConfig, trajectory_rows

PAD = 0


def states_per_second(model, rows: list[TrajectoryRow], packed: bool, batch_size: int, steps: int) -> dict:
    config = LossConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    trained, started = 0, None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            started = time.perf_counter()
        batch_rows = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
        batch = collate_packed(batch_rows, PAD) if packed else collate_states(batch_rows, PAD)
        output = compute_losses(model, batch, config)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        if step >= 1:
            trained += output.states
    seconds = time.perf_counter() - started
    return {"states": trained, "seconds": round(seconds, 2), "states_per_s": round(trained / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-token", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=256, seed=0, hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 48, (args.prompts,), generator=generator).tolist()
    prompts = [{"prompt_id": f"p{i}", "prompt_ids": torch.randint(1, 256, (length,), generator=generator).tolist()}
               for i, length in enumerate(lengths)]
    config = CollectConfig(n_token=args.n_token, max_new_tokens=args.max_new_tokens, min_loop_tokens=0)
    rows = trajectory_rows(model.eval(), prompts, "tiny", config).rows
    mean_states = sum(len(row.states) for row in rows) / len(rows)

    single = states_per_second(copy.deepcopy(model), rows, packed=False, batch_size=args.batch_size, steps=args.steps)
    packed = states_per_second(copy.deepcopy(model), rows, packed=True, batch_size=args.batch_size, steps=args.steps)
    print(json.dumps({
        "rows": len(rows), "mean_states_per_block": round(mean_states, 2), "n_token": args.n_token,
        "batch_size": args.batch_size, "one_state_per_row": single, "packed": packed,
        "packed_speedup_states_per_s": round(packed["states_per_s"] / single["states_per_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()

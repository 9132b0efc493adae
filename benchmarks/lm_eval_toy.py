"""lm-evaluation-harness, unchanged, against the served model: its `local-completions` and
`local-chat-completions` backends, next to our own evaluation of the same model on the same
held-out problems of toy math (`--domain math`) or toy chat (`--domain chat`).

Starts a private local Ray + Serve app for `--model` (default: the domain's teacher), writes three
small local lm-eval tasks into a temporary directory and runs them through `lm_eval.simple_evaluate`:

- generate: `generate_until`, greedy, scored by exact_match on the final answer (a regex filter
  with `check_answer`'s rule: the first "The answer is X."), via local-completions on the prompt
  text (chat: the conversation as the chat template renders it);
- loglikelihood: the log-probability of each reference answer given its prompt (the backend sends
  token ids with echo=true, logprobs=1, max_tokens=1), via local-completions; its `acc` is
  whether the reference is the greedy continuation;
- chat: the generate task via local-chat-completions. Math: the problem as one user message
  (`apply_chat_template`; a tokenizer without a chat template gets the server's `role: content`
  lines). Chat: the conversation itself, as lm-eval sends multi-turn few-shot context: the system
  message is the task's per-document description, the conversation's earlier exchanges are its
  few-shot turns (a sampler that returns the document's own), and the last user turn is the
  question, so the server renders exactly the toy prompt through the model's template. lm-eval's
  exact_match compares the value as text, where `check_answer` takes a list in any order.

Our side, in this process without Ray: greedy AR decodes of the same prompts scored by
`cllm.toy.tasks.check_answer` (as pipelines/evaluate.py scores them), and the reference answers'
log-probabilities from a plain forward pass. The table shows both scores, their ratio, how many
lm-eval replies equal our decode, and the largest log-probability difference. Run (needs the
`eval` extra, `pip install -e '.[ray,eval]'`; offline):

    python benchmarks/lm_eval_toy.py                                   # the toy-math teacher
    python benchmarks/lm_eval_toy.py --model runs/demo/cllm/hf --generate 100 --loglikelihood 50
    python benchmarks/lm_eval_toy.py --domain chat --model runs/demo-chat/cllm/hf --generate 100
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from cllm.evaluation import greedy_texts
from cllm.hf import context_length, encode_chat, load_model, load_tokenizer, local_model_dir
from cllm.toy import ToyPrompt
from cllm.toy.chat import final_value
from cllm.toy.math import final_number
from cllm.toy.tasks import check_answer, toy_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port  # noqa: E402  (tests/helpers.py)

DOMAINS = ("math", "chat")
# Where the next problem (math) or turn (chat) would start; the toy teachers end with EOS first.
STOPS = {"math": "Question:", "chat": "<|im_start|>"}
# Each domain's rule: the first such sentence counts (cllm.toy.math.final_number, cllm.toy.chat.final_value).
ANSWER_REGEXES = {"math": r"The answer is (-?\d+)\.", "chat": r"The answer is ([^.\n]+)\."}


@dataclass
class PathScore:
    """One lm-eval request path (generate_until or loglikelihood, completions or chat), scored by
    lm-eval and by our own evaluation."""

    path: str
    problems: int
    lm_eval: float  # lm-eval's score
    ours: float  # our evaluation's score on the same problems
    agreement: str  # how lm-eval's per-problem outputs compare with ours
    seconds: float


# -- the local lm-eval tasks ----------------------------------------------------------------------


def _document(index: int, problem: ToyPrompt, domain: str) -> dict:
    """One problem as an lm-eval document. Chat's also carry the conversation in parts: the system
    message, the earlier exchanges and the last user turn."""
    final = final_number(problem.answer) if domain == "math" else final_value(problem.answer)
    document = {"index": index, "prompt": problem.prompt, "answer": problem.answer, "final": str(final)}
    if domain == "chat":
        (_, system), *turns, (_, question) = problem.messages
        exchanges = [{"user": turns[i][1], "assistant": turns[i + 1][1]} for i in range(0, len(turns), 2)]
        document.update(system=system, exchanges=exchanges, question=question)
    return document


def write_tasks(directory: Path, problems: list[ToyPrompt], max_gen_toks: int, domain: str) -> dict[str, object]:
    """A JSONL of the problems and the three tasks that read it: task configs (JSON is YAML) in
    `directory`, or, for chat's chat task, a task object (its sampler is a class). Returns what
    `run_lm_eval` takes for each of "generate", "loglikelihood" and "chat"."""
    data = directory / f"toy_{domain}_heldout.jsonl"
    with data.open("w") as file:
        for index, problem in enumerate(problems):
            file.write(json.dumps(_document(index, problem, domain)) + "\n")
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "metadata": {"version": 1.0},
    }
    generate = {
        **common,
        "output_type": "generate_until",
        "doc_to_target": "{{final}}",
        "generation_kwargs": {"until": [STOPS[domain]], "max_gen_toks": max_gen_toks, "do_sample": False,
                              "temperature": 0.0},
        "filter_list": [{"name": "final", "filter": [
            {"function": "regex", "regex_pattern": ANSWER_REGEXES[domain]}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    loglikelihood = {
        **common,
        "output_type": "loglikelihood",
        "target_delimiter": "",  # math's answers start with their space; chat's follow the generation prompt
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    tasks: dict[str, object] = {}
    for kind, config in (("generate", generate), ("loglikelihood", loglikelihood), ("chat", generate)):
        name = f"toy_{domain}_{kind}"
        (directory / f"{name}.yaml").write_text(json.dumps({"task": name, **config}, indent=1))
        tasks[kind] = name
    if domain == "chat":
        tasks["chat"] = conversation_task(generate)
    return tasks


def conversation_task(generate: dict):
    """The generate task with each document's own conversation as its chat context: lm-eval puts
    the description (here the document's system message) first, then `num_fewshot` few-shot
    exchanges as user and assistant turns (the sampler returns the document's earlier exchanges,
    0 to 2), then the question."""
    from lm_eval.api.samplers import ContextSampler
    from lm_eval.api.task import ConfigurableTask

    class EarlierExchanges(ContextSampler):
        def sample(self, n: int, eval_doc: dict | None = None, df=None, **kwargs) -> list[dict]:
            return list(eval_doc["exchanges"]) if eval_doc is not None else []

    return ConfigurableTask(config={
        **generate, "task": "toy_chat_chat", "description": "{{system}}", "doc_to_text": "{{question}}",
        "num_fewshot": 2,  # an upper bound: the sampler returns what the conversation has
        "fewshot_config": {"sampler": EarlierExchanges, "split": "test", "doc_to_text": "{{user}}",
                           "doc_to_target": "{{assistant}}"},
    })


def run_lm_eval(backend: str, task, limit: int, base_url: str, model_args: dict, directory: Path,
                chat: bool = False) -> tuple[dict, list[dict], float]:
    """(results of `task` (a task name in `directory`, or a task object), its logged samples in
    document order, seconds) of one simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    name = task if isinstance(task, str) else task.config.task
    print(f"lm-eval: {name} through {backend}, {limit} problems", flush=True)
    began = time.perf_counter()
    output = simple_evaluate(
        model=backend, model_args={"base_url": base_url, **model_args}, tasks=[task], limit=limit,
        task_manager=TaskManager(include_path=str(directory)), apply_chat_template=chat, log_samples=True,
    )
    seconds = time.perf_counter() - began
    samples = sorted(output["samples"][name], key=lambda sample: sample["doc"]["index"])
    return output["results"][name], samples, seconds


# -- our own evaluation ---------------------------------------------------------------------------


@torch.inference_mode()
def answer_logprobs(model, tokenizer, problems: list[ToyPrompt]) -> list[tuple[float, bool]]:
    """(log-probability of the reference answer given the prompt, whether it is the greedy
    continuation) from one plain forward pass per problem: the prompt as the server encodes it
    (with BOS), the answer as lm-eval's `_encode_pair` splits it off the whole text."""
    scores = []
    for problem in problems:
        context = tokenizer(problem.prompt)["input_ids"]
        whole = tokenizer(problem.prompt + problem.answer)["input_ids"]
        assert whole[: len(context)] == context, "the prompt's tokens change when the answer follows"
        logits = model(input_ids=torch.tensor([whole])).logits[0, len(context) - 1 : -1].float()
        targets = torch.tensor(whole[len(context) :])
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        scores.append((float(chosen.sum()), bool((logprobs.argmax(-1) == targets).all())))
    return scores


# -- serving --------------------------------------------------------------------------------------


def start_server(model_dir: str, served_name: str, args) -> str:
    """A private local Ray + Serve app for `model_dir`; returns its base URL."""
    import ray
    from ray import serve

    from cllm_serve.app import BuilderArgs, build_app

    port = free_port()
    # address="local": a new Ray here, never one that happens to run on this machine already.
    ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=100 * 1024 * 1024,
             include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(BuilderArgs(
        model=model_dir, served_model_name=served_name, mode=args.mode, n_token=args.n_token, num_cpus=1,
        num_gpus=0, max_batch_size=args.concurrency, max_ongoing_requests=max(16, 2 * args.concurrency),
    )), name="lm_eval", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_server() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# -- the benchmark --------------------------------------------------------------------------------


def generate_row(path: str, samples: list[dict], results: dict, problems: list[ToyPrompt],
                 our_texts: list[str], seconds: float, domain: str) -> PathScore:
    ours = [check_answer(domain, text, problem.answer) for text, problem in zip(our_texts, problems)]
    same = sum(sample["resps"][0][0] == text.split(STOPS[domain])[0] for sample, text in zip(samples, our_texts))
    agree = sum(
        (sample["filtered_resps"][0] == sample["target"]) == check for sample, check in zip(samples, ours)
    )
    return PathScore(path, len(samples), results["exact_match,final"], sum(ours) / len(ours),
               f"same text {same}/{len(samples)}, same verdict {agree}/{len(samples)}", seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=DOMAINS, default="math", help="the toy problems (default: math)")
    parser.add_argument("--model", help="toy name or model directory (default: the domain's teacher)")
    parser.add_argument("--generate", type=int, default=100, help="problems of the generate and chat tasks")
    parser.add_argument("--loglikelihood", type=int, default=50, help="problems of the loglikelihood task")
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--mode", choices=["jacobi", "ar"], default="jacobi", help="the server's decoding")
    parser.add_argument("--n-token", type=int, default=16, help="the server's Jacobi block size")
    parser.add_argument("--concurrency", type=int, default=8, help="lm-eval's num_concurrent; the server's batch")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--output", help="also write the table and samples' summary as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = args.model or ("toy" if args.domain == "math" else f"toy-{args.domain}")
    # lm-eval loads the JSONL with `datasets` and the tokenizer with transformers: nothing remote.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = local_model_dir(args.model)
    served_name = args.model  # what lm-eval sends as `model`
    problems = toy_prompts("heldout", args.domain, limit=max(args.generate, args.loglikelihood))
    workdir = tempfile.TemporaryDirectory(prefix="lm-eval-toy-")
    directory = Path(workdir.name)
    tasks = write_tasks(directory, problems, args.max_gen_toks, args.domain)
    tokenizer = load_tokenizer(model_dir)
    # tokenizer: the model's own (lm-eval would fetch `model` from the hub); add_bos_token: whether
    # the server's and our encoding of a text prompt starts with BOS (chat's ChatML tokenizer has
    # none); max_length: the model's context.
    completions_args = {"model": served_name, "tokenizer_backend": "huggingface", "tokenizer": model_dir,
                        "add_bos_token": tokenizer.bos_token_id is not None,
                        "max_length": context_length(AutoConfig.from_pretrained(model_dir), tokenizer),
                        "num_concurrent": args.concurrency, "max_retries": 1}
    chat_args = {"model": served_name, "num_concurrent": args.concurrency, "max_retries": 1}

    print(f"serving {args.model} ({model_dir}), mode={args.mode}", flush=True)
    base_url = start_server(model_dir, served_name, args)
    try:
        generate = run_lm_eval("local-completions", tasks["generate"], args.generate,
                               f"{base_url}/v1/completions", completions_args, directory)
        loglikelihood = run_lm_eval("local-completions", tasks["loglikelihood"], args.loglikelihood,
                                    f"{base_url}/v1/completions", completions_args, directory)
        chat = run_lm_eval("local-chat-completions", tasks["chat"], args.generate,
                           f"{base_url}/v1/chat/completions", chat_args, directory, chat=True)
    finally:
        stop_server()
        workdir.cleanup()

    print("our evaluation: greedy AR decodes and plain forward passes in this process", flush=True)
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir, device="cpu")
    began = time.perf_counter()
    gen_problems = problems[: args.generate]
    our_texts = greedy_texts(model, tokenizer, [tokenizer(p.prompt)["input_ids"] for p in gen_problems],
                             args.max_gen_toks)
    decode_seconds = time.perf_counter() - began
    # The chat path's reference: the same decode of the prompt as the server renders the chat (math:
    # the problem as one user message; chat: the conversation, which is the toy prompt itself).
    chat_prompts = [encode_chat(tokenizer, p.messages if args.domain == "chat" else [("user", p.prompt)])[1]
                    for p in gen_problems]
    our_chat_texts = greedy_texts(model, tokenizer, chat_prompts, args.max_gen_toks)
    ll_problems = problems[: args.loglikelihood]
    reference = answer_logprobs(model, tokenizer, ll_problems)

    rows = [generate_row("generate_until, local-completions", generate[1], generate[0], gen_problems,
                         our_texts, generate[2], args.domain)]
    ll_samples = loglikelihood[1]
    served = [(float(sample["resps"][0][0][0]), bool(sample["resps"][0][0][1])) for sample in ll_samples]
    max_diff = max(abs(ll - ref) for (ll, _), (ref, _) in zip(served, reference))
    same_greedy = sum(s[1] == r[1] for s, r in zip(served, reference))
    rows.append(PathScore("loglikelihood, local-completions", len(ll_samples), loglikelihood[0]["acc,none"],
                    sum(greedy for _, greedy in reference) / len(reference),
                    f"max |logprob diff| {max_diff:.2e}, same is_greedy {same_greedy}/{len(reference)}",
                    loglikelihood[2]))
    rows.append(generate_row("generate_until, local-chat-completions", chat[1], chat[0], gen_problems,
                             our_chat_texts, chat[2], args.domain))

    print(f"\nlm-eval vs our evaluation, {args.model} on toy-{args.domain} held-out problems "
          f"(server: {args.mode}, n_token={args.n_token}; ours: greedy AR, {decode_seconds:.0f} s to decode)")
    header = f"{'path':<40} {'N':>4} {'lm-eval':>8} {'ours':>6} {'ratio':>6} {'lm-eval s':>9}  agreement"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = row.lm_eval / row.ours if row.ours else math.nan
        print(f"{row.path:<40} {row.problems:>4} {row.lm_eval:>8.3f} {row.ours:>6.3f} {ratio:>6.3f} "
              f"{row.seconds:>9.0f}  {row.agreement}")
    print("\nscores: generate, chat: exact_match of the final answer (ours: check_answer on greedy AR decodes; for "
          "chat, of the prompt as the server renders the chat); loglikelihood: acc = the reference answer is the "
          "greedy continuation (ours: argmax of a plain forward pass)")
    chat_ratio = rows[2].lm_eval / rows[0].lm_eval if rows[0].lm_eval else math.nan
    print(f"chat / completions exact_match through lm-eval: {chat_ratio:.3f}; the chat prompt as served: "
          f"{tokenizer.decode(chat_prompts[0])!r}")
    print(f"chat reply: {chat[1][0]['resps'][0][0][:100]!r}")
    if args.output:
        Path(args.output).write_text(json.dumps({
            "model": args.model, "domain": args.domain, "mode": args.mode, "n_token": args.n_token,
            "rows": [row.__dict__ for row in rows], "max_logprob_diff": max_diff,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

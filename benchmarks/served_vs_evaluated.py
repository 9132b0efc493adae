"""Does the served model reply to a conversation exactly as the evaluation decoded it?

Takes one model of an evaluation report (`pipelines/evaluate.py --output DIR`: report.json and
outputs.jsonl), starts a private local Ray + Serve app for it (`--url` and `--api-key`: a running
server instead), sends each of the report's conversations through `/v1/chat/completions` with the
official `openai` client (temperature 0, `max_tokens` the report's `max_new_tokens`, the Jacobi
block size `n_token`, a few at a time) and compares every reply with the report's Jacobi text of
that prompt at that block size, and with its AR text (greedy Jacobi is lossless: they agree).

The server renders the messages through the model's chat template (`cllm.hf.encode_chat`), while
the evaluation decoded each toy prompt's own text (`cllm.prompts.load_prompts`): the two token ids
are checked equal first, so a reply can only differ by the decoding. Both sides must decode on the
same device and dtype (the local server runs on the CPU, in fp32, as the evaluation does there).

Prints the conversations compared, the replies identical to each text, finish reasons (`stop`
unless a reply ran out of budget), whether any reply shows a special token such as `<|im_end|>`
(the chat model's EOS ends a reply, it is never part of it), and the first mismatches with both
texts. Exits 1 on any mismatch, refused request or special token. Run (the `ray` extra):

    python pipelines/demo.py --domain chat          # runs/demo-chat/report: teacher and cllm on toy-chat:heldout
    python benchmarks/served_vs_evaluated.py --report runs/demo-chat/report --model cllm
    python benchmarks/served_vs_evaluated.py --report runs/demo-chat/report --model cllm \\
        --url http://127.0.0.1:8000 --api-key "$CLLM_API_KEY"     # a server already running that model
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai

from cllm.hf import encode_chat, load_tokenizer, local_model_dir
from cllm.prompts import load_prompts
from cllm.report import OUTPUTS_JSONL, REPORT_JSON
from cllm.toy import ToyPrompt, parse_toy_name
from cllm.toy.tasks import toy_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_toy import start_server, stop_server  # noqa: E402  (its private local Ray + Serve app)


@dataclass(frozen=True)
class Reply:
    prompt_id: str
    text: str
    finish_reason: str  # "stop", "length", or "refused" (then `error` says why)
    error: str = ""


@dataclass(frozen=True)
class Report:
    """What the comparison needs of one model's evaluation."""

    model_path: str
    prompts: str
    max_new_tokens: int
    n_tokens: list[int]
    texts: dict[tuple[str, int], dict[str, str]]  # (decoding, n_token) -> prompt id -> text, in prompt order


def read_report(directory: Path, model: str) -> Report:
    settings = json.loads((directory / REPORT_JSON).read_text())["settings"]
    if model not in settings["models"]:
        raise SystemExit(f"--model {model!r} is not in the report; it has {list(settings['models'])}")
    texts: dict[tuple[str, int], dict[str, str]] = {}
    with (directory / OUTPUTS_JSONL).open() as file:
        for line in file:
            row = json.loads(line)
            if row["model"] == model:
                texts.setdefault((row["decoding"], row["n_token"]), {})[row["prompt_id"]] = row["text"]
    return Report(settings["models"][model], settings["prompts"], settings["max_new_tokens"],
                  settings["n_tokens"], texts)


def conversations(spec: str, prompt_ids: list[str]) -> list[ToyPrompt]:
    """The toy prompts the report decoded, in its order: toy prompts carry their messages."""
    toy = parse_toy_name(spec)
    if toy is None:
        raise SystemExit(f"--prompts {spec!r} is not a toy source: only toy prompts carry their messages")
    by_id = {prompt.prompt_id: prompt for prompt in toy_prompts(toy.split, toy.domain, limit=len(prompt_ids))}
    missing = [prompt_id for prompt_id in prompt_ids if prompt_id not in by_id]
    if missing:
        raise SystemExit(f"{len(missing)} of the report's prompts are not among {spec}'s, e.g. {missing[0]}")
    chosen = [by_id[prompt_id] for prompt_id in prompt_ids]
    if not all(prompt.messages for prompt in chosen):
        raise SystemExit(f"{spec}'s prompts are not conversations (no messages): use a chat source")
    return chosen


def rendered_differently(tokenizer, spec: str, prompts: list[ToyPrompt]) -> list[str]:
    """Prompts whose messages, as the server's chat route encodes them, are not the token ids the
    evaluation decoded."""
    records, _ = load_prompts(spec, tokenizer, limit=len(prompts))
    evaluated = {record.prompt_id: record.prompt_ids for record in records}
    return [p.prompt_id for p in prompts if encode_chat(tokenizer, p.messages)[1] != evaluated.get(p.prompt_id)]


def ask(client: openai.OpenAI, model: str, prompt: ToyPrompt, max_tokens: int, n_token: int) -> Reply:
    try:
        response = client.chat.completions.create(
            model=model, messages=[{"role": role, "content": text} for role, text in prompt.messages],
            temperature=0, max_tokens=max_tokens, extra_body={"n_token": n_token},
        )
    except openai.BadRequestError as error:  # e.g. the prompt and max_tokens overflow the context
        return Reply(prompt.prompt_id, "", "refused", error.message)
    choice = response.choices[0]
    return Reply(prompt.prompt_id, choice.message.content or "", choice.finish_reason)


def compare(replies: list[Reply], report: Report, n_token: int, special: list[str], show: int) -> bool:
    """Print the comparison; whether every reply is the evaluated text and clean."""
    jacobi, ar = report.texts[("jacobi", n_token)], report.texts[("ar", 1)]
    mismatches = [reply for reply in replies if not reply.text == jacobi[reply.prompt_id] == ar[reply.prompt_id]]
    leaked = [reply for reply in replies if any(token in reply.text for token in special)]
    refused = [reply for reply in replies if reply.error]
    print(f"conversations compared: {len(replies)}")
    print(f"identical to evaluate's Jacobi n={n_token} text: {len(replies) - len(mismatches)}/{len(replies)}; "
          f"to its AR text: {sum(reply.text == ar[reply.prompt_id] for reply in replies)}/{len(replies)}")
    print("finish reasons: " + ", ".join(f"{reason} {count}" for reason, count in
                                         Counter(reply.finish_reason for reply in replies).most_common()))
    print(f"replies containing a special token ({', '.join(special)}): {len(leaked)}")
    if refused:
        print(f"refused, e.g. {refused[0].prompt_id}: {refused[0].error}")
    for reply in mismatches[:show]:
        print(f"\nmismatch {reply.prompt_id} ({reply.finish_reason})\n  served: {reply.text!r}\n"
              f"  Jacobi: {jacobi[reply.prompt_id]!r}\n  AR:     {ar[reply.prompt_id]!r}")
    return not mismatches and not leaked and not refused


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, type=Path, help="evaluate's --output: report.json, outputs.jsonl")
    parser.add_argument("--model", required=True, help="which model of the report (its NAME in --models)")
    parser.add_argument("--prompts", help="toy chat source of the conversations (default: the report's --prompts)")
    parser.add_argument("--limit", type=int, default=100, help="the report's first prompts to send (default: 100)")
    parser.add_argument("--n-token", type=int, help="the server's Jacobi block size (default: the report's first)")
    parser.add_argument("--mode", choices=["jacobi", "ar"], default="jacobi", help="the local server's decoding")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray (default: 2)")
    parser.add_argument("--url", help="a running server's base URL, instead of starting one here")
    parser.add_argument("--api-key", default="unused", help="the running server's API key")
    parser.add_argument("--show", type=int, default=3, help="mismatches to print (default: 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = read_report(args.report, args.model)
    args.n_token = args.n_token or report.n_tokens[0]
    if ("jacobi", args.n_token) not in report.texts:
        raise SystemExit(f"the report has no Jacobi texts of {args.model} at n_token={args.n_token}")
    spec = args.prompts or report.prompts
    prompts = conversations(spec, list(report.texts[("ar", 1)])[: args.limit])
    model_dir = local_model_dir(report.model_path)
    tokenizer = load_tokenizer(model_dir)
    different = rendered_differently(tokenizer, spec, prompts)
    print(f"{args.model} ({report.model_path}) on {len(prompts)} conversations of {spec}, "
          f"max_tokens={report.max_new_tokens}, n_token={args.n_token}: the chat template renders "
          f"{len(prompts) - len(different)}/{len(prompts)} to the evaluated token ids", flush=True)
    if different:
        print(f"rendered differently, e.g. {different[0]}: the replies would not compare")
        return 1
    url = args.url or start_server(model_dir, args.model, args)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=900)
        served_name = client.models.list().data[0].id
        with ThreadPoolExecutor(args.concurrency) as pool:
            replies = list(pool.map(lambda p: ask(client, served_name, p, report.max_new_tokens, args.n_token),
                                    prompts))
    finally:
        if not args.url:
            stop_server()
    return 0 if compare(replies, report, args.n_token, tokenizer.all_special_tokens, args.show) else 1


if __name__ == "__main__":
    sys.exit(main())

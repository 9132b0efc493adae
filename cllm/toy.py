"""Toy teachers: tiny Llama models that the project trains itself, so that everything runs offline.

Two domains, each with a deterministic corpus, a byte-level BPE tokenizer trained on its own
training split, and a small `LlamaForCausalLM` trained from scratch with a fixed seed and token
budget (minutes on a CPU):

- `math`: generated GSM8K-style word problems (one or two + / - steps, small operands) whose
  answers are formulaic step-by-step lines ending "The answer is N.". Exact-answer metric.
- `code`: (docstring -> function source) pairs extracted with `ast` from the running
  interpreter's standard library, CodeSearchNet-Python style, split into train / held-out by
  top-level module. Raw stdlib source of the training modules is mixed in for pretraining.

A teacher is built on first use and cached under `$CLLM_CACHE` (default `~/.cache/cllm`) in
`toy-<TOY_VERSION>/<domain>/`; a file lock stops two processes from building it at once.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cllm.models import default_device
from cllm.schedule import warmup_cosine

TOY_VERSION = "1"
"""Bump when a corpus, tokenizer or training change makes cached teachers stale."""

DOMAINS = ("math", "code")
DEFAULT_DOMAIN = "math"
SPLITS = ("train", "heldout")

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CODE_PROMPT_PREFIX = "Please generate code based on the following doc:\n"
CODE_PROMPT_SEPARATOR = "\nCode:\n"
BUILD_INFO_FILE = "toy_build.json"


@dataclass(frozen=True)
class ToyPrompt:
    """One task instance: the exact text the teacher is given and the reference continuation."""

    prompt_id: str
    prompt: str
    answer: str
    domain: str
    split: str
    source: str = ""  # code: "<stdlib file>:<function>"; math: the generator's name


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines a toy teacher. Same config, same machine: same weights."""

    domain: str = DEFAULT_DOMAIN
    seed: int = 0
    # tokenizer
    vocab_size: int = 512
    tokenizer_corpus_docs: int = 20_000  # documents the BPE is trained on
    # model (Llama)
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 256  # context length; longer documents are truncated in training
    # training
    train_tokens: int = 2_500_000  # the fixed budget: non-padding tokens fed to the model
    max_seconds: float | None = None  # safety cap; stopping on it makes the build non-reproducible
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.03
    loss_on_prompt: bool = False  # False: only answer tokens (and EOS) carry loss
    raw_text_fraction: float = 0.0  # code: share of training documents that are raw stdlib source
    threads: int = 2
    # held-out evaluation recorded with the build
    eval_prompts: int = 200
    progress_every: float = 0.05  # print a progress line every this fraction of the budget

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown toy domain {self.domain!r}; choose from {DOMAINS}")


def default_config(domain: str | None = None) -> ToyConfig:
    """The configuration of the teacher `load_toy(domain)` builds."""
    domain = _resolve_domain(domain)
    if domain == "math":
        # Measured on held-out problems: 1.85M parameters reach 97.5% exact answers after 5M
        # tokens (88% after 3M); a 3.5M model is no better per token and half as fast on CPU.
        return ToyConfig(domain="math", hidden_size=192, intermediate_size=512, batch_size=32,
                         train_tokens=5_000_000)
    # Code is slow per token on CPU (about 1.8k tokens/s on 2 cores at this size and context), so
    # 1M tokens fits the ~10 minute budget; 2.5M tokens (held-out loss 3.4 instead of 4.3) took
    # 30 s on a GPU. The code teacher stays weak and loopy at either budget.
    return ToyConfig(
        domain="code",
        train_tokens=1_000_000,
        vocab_size=2048,
        tokenizer_corpus_docs=8_000,
        max_length=384,
        batch_size=8,
        learning_rate=1.5e-3,
        loss_on_prompt=True,
        raw_text_fraction=0.3,
    )


def _resolve_domain(domain: str | None) -> str:
    domain = DEFAULT_DOMAIN if domain is None else domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; choose from {DOMAINS}")
    return domain


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _prompt_id(domain: str, prompt: str) -> str:
    return f"toy-{domain}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------
# Math corpus
# ---------------------------------------------------------------------------------------------

MATH_HELDOUT_MODULUS = 20  # a question is held out when its hash is 0 modulo this (about 5%)
MATH_TRAIN_PROMPTS = 5_000
MATH_HELDOUT_PROMPTS = 1_000

_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava")
_ITEMS = ("apples", "books", "pens", "cookies", "stickers", "marbles", "cards", "shells", "toys",
          "coins")
_MATH_SOURCE = f"cllm.toy math generator v{TOY_VERSION}"
_ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")


def _math_problem(rng: random.Random) -> tuple[str, str]:
    """One word problem (question, answer). Four templates, one or two steps, + and - only, and
    operands up to 15 (9 for the others) so that a tiny model learns the arithmetic in minutes.
    The answers repeat a fixed sentence structure, which is what lets consistency training
    fast-forward through them."""
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    template = rng.randrange(4)
    a = rng.randint(2, 15)
    b = rng.randint(1, 9)
    if template == 0:  # gain
        question = (f"{name} has {a} {item}. {friend} gives {name} {b} more {item}. "
                    f"How many {item} does {name} have now?")
        steps = [f"{name} gets {b} more, so {name} has {a} + {b} = {a + b} {item}."]
        result = a + b
    elif template == 1:  # loss
        b = min(b, a - 1)
        question = (f"{name} has {a} {item}. {name} gives {b} {item} to {friend}. "
                    f"How many {item} does {name} have now?")
        steps = [f"{name} gives away {b}, so {name} has {a} - {b} = {a - b} {item}."]
        result = a - b
    elif template == 2:  # gain then loss
        c = rng.randint(1, min(9, a + b - 1))
        question = (f"{name} has {a} {item}. {name} buys {b} more {item}. Then {name} gives {c} {item} "
                    f"to {friend}. How many {item} does {name} have now?")
        steps = [f"{name} buys {b} more, so {name} has {a} + {b} = {a + b} {item}.",
                 f"{name} gives away {c}, so {name} has {a + b} - {c} = {a + b - c} {item}."]
        result = a + b - c
    else:  # two people together
        question = (f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
                    f"How many {item} do they have together?")
        steps = [f"{friend} has {a} + {b} = {a + b} {item}.",
                 f"Together they have {a} + {a + b} = {a + a + b} {item}."]
        result = a + a + b
    answer = " ".join([f"{name} starts with {a} {item}.", *steps, f"The answer is {result}."])
    return question, answer


def _math_is_heldout(question: str) -> bool:
    return _stable_hash(question) % MATH_HELDOUT_MODULUS == 0


def math_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _math_examples(split: str, seed: int) -> Iterator[ToyPrompt]:
    """Endless stream of distinct problems of one split. The split is a hash of the question
    text, so no held-out question can ever appear in training, whatever the stream lengths."""
    # Different streams per split only make the held-out search fast; the hash decides membership.
    rng = random.Random(f"toy-math-{split}-{seed}")
    seen: set[str] = set()
    want_heldout = split == "heldout"
    while True:
        question, answer = _math_problem(rng)
        if _math_is_heldout(question) != want_heldout or question in seen:
            continue
        seen.add(question)
        prompt = math_prompt(question)
        yield ToyPrompt(_prompt_id("math", prompt), prompt, " " + answer, "math", split, _MATH_SOURCE)


def _math_training_documents(seed: int) -> Iterator[ToyPrompt]:
    """Training stream: fresh problems (repeats allowed across the stream), never held-out ones."""
    rng = random.Random(f"toy-math-train-stream-{seed}")
    while True:
        question, answer = _math_problem(rng)
        if not _math_is_heldout(question):
            prompt = math_prompt(question)
            yield ToyPrompt(_prompt_id("math", prompt), prompt, " " + answer, "math", "train", _MATH_SOURCE)


def math_final_number(text: str) -> int | None:
    """The N of the first "The answer is N." in `text`, if any."""
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Code corpus
# ---------------------------------------------------------------------------------------------

CODE_HELDOUT_MODULUS = 10  # a top-level stdlib module is held out when its hash is 0 modulo this
_SKIPPED_STDLIB_PARTS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "site-packages",
    "dist-packages", "ensurepip", "__pycache__", "pydoc_data", "encodings", "__phello__",
})
_MAX_DOCSTRING_CHARS = 400
_MAX_CODE_CHARS = 800
_MAX_RAW_FILE_CHARS = 200_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    """Pure-Python stdlib modules, in sorted (deterministic) order, without tests, demos and
    generated data tables."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_STDLIB_PARTS.intersection(relative.parts) or relative.parts[0].startswith("config-"):
            continue
        files.append(path)
    return files


def code_module(path: Path) -> str:
    """The top-level module a stdlib file belongs to: the split unit, so a package is never split."""
    return path.relative_to(stdlib_root()).parts[0].removesuffix(".py")


def _code_is_heldout(module: str) -> bool:
    return _stable_hash(module) % CODE_HELDOUT_MODULUS == 0


def code_prompt(docstring: str) -> str:
    return f"{CODE_PROMPT_PREFIX}{docstring}{CODE_PROMPT_SEPARATOR}"


def function_pairs(source: str) -> Iterator[tuple[str, str, str]]:
    """(name, docstring, dedented source without the docstring) for every documented function
    (methods and nested functions included) in the Python `source`, in `ast.walk` order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        body = node.body
        # Skip one-liners and functions whose docstring shares a line with the header or the code.
        if not docstring or len(body) < 2 or body[0].lineno <= node.lineno:
            continue
        if body[1].lineno <= body[0].end_lineno:
            continue
        kept = lines[node.lineno - 1 : body[0].lineno - 1] + lines[body[0].end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        # Caps keep prompt + code within the teacher's context.
        if len(docstring) <= _MAX_DOCSTRING_CHARS and len(code) <= _MAX_CODE_CHARS:
            yield node.name, docstring, code


def code_corpus() -> dict[str, list[ToyPrompt]]:
    """Both splits of the code domain, from one pass over the standard library, in file order.
    Held-out pairs whose prompt also occurs in training (an overriding method that copies its
    parent's docstring, say) are dropped, so that no held-out prompt is ever seen in training."""
    splits: dict[str, list[ToyPrompt]] = {name: [] for name in SPLITS}
    for path in _stdlib_files():
        split = "heldout" if _code_is_heldout(code_module(path)) else "train"
        source = path.read_text(encoding="utf-8", errors="replace")
        relative = path.relative_to(stdlib_root()).as_posix()
        for function, docstring, code in function_pairs(source):
            prompt = code_prompt(docstring)
            splits[split].append(ToyPrompt(_prompt_id("code", prompt + code), prompt, code, "code",
                                           split, f"{relative}:{function}"))
    seen = {example.prompt for example in splits["train"]}
    splits["heldout"] = [example for example in splits["heldout"] if example.prompt not in seen]
    return splits


def _code_raw_texts() -> list[str]:
    """Source of the training modules, for pretraining (held-out modules are never included)."""
    texts = []
    for path in _stdlib_files():
        if not _code_is_heldout(code_module(path)):
            texts.append(path.read_text(encoding="utf-8", errors="replace")[:_MAX_RAW_FILE_CHARS])
    return texts


# ---------------------------------------------------------------------------------------------
# Public corpus API
# ---------------------------------------------------------------------------------------------


def toy_prompts(split: str = "train", domain: str | None = None, limit: int | None = None,
                seed: int = 0) -> list[ToyPrompt]:
    """Prompts of a toy domain's split, each with its reference answer, in a fixed order.

    math: `MATH_TRAIN_PROMPTS` / `MATH_HELDOUT_PROMPTS` distinct problems (any `limit` works:
    the generator is endless). code: every extracted pair of the split's modules."""
    domain = _resolve_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if domain == "math":
        default = MATH_TRAIN_PROMPTS if split == "train" else MATH_HELDOUT_PROMPTS
        count = default if limit is None else limit
        stream = _math_examples(split, seed)
        return [next(stream) for _ in range(count)]
    examples = code_corpus()[split]
    return examples if limit is None else examples[:limit]


def check_answer(domain: str | None, generated_text: str, reference_answer: str) -> bool | None:
    """Task metric: math, whether the final number ("The answer is N.") matches the reference;
    code has no task metric (None)."""
    if _resolve_domain(domain) != "math":
        return None
    expected = math_final_number(reference_answer)
    return expected is not None and math_final_number(generated_text) == expected


def repetition_rate(token_ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of `token_ids` that already occurred earlier in it: 0 for text
    without repeats, near 1 for a loop. A degenerate, loopy code model scores high."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _tokenizer_corpus(config: ToyConfig) -> list[str]:
    if config.domain == "math":
        stream = _math_training_documents(config.seed)
        examples = (next(stream) for _ in range(config.tokenizer_corpus_docs))
        return [example.prompt + example.answer for example in examples]
    pairs = [example.prompt + example.answer for example in code_corpus()["train"]]
    return pairs[: config.tokenizer_corpus_docs] + _code_raw_texts()


def train_tokenizer(config: ToyConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the domain's training split (digits split one by one for math), with
    `<pad>`, `<bos>`, `<eos>`; encoding a text prepends `<bos>`."""
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if config.domain == "math":
        # One token per digit keeps arithmetic learnable: no arbitrary multi-digit merges.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(config), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=config.max_length, padding_side="left",
    )


# ---------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------


def new_teacher(config: ToyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by `config`, seeded by `config.seed`."""
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LlamaForCausalLM(llama)


@dataclass
class _Encoded:
    ids: list[int]
    prompt_length: int  # tokens (bos included) that carry no loss unless loss_on_prompt


def _encode(tokenizer: PreTrainedTokenizerFast, example: ToyPrompt, max_length: int) -> _Encoded:
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_length]
    return _Encoded(ids, len(prompt_ids))


def _raw_chunks(tokenizer: PreTrainedTokenizerFast, max_length: int) -> list[_Encoded]:
    """Training-module source cut into context-sized windows (all tokens carry loss)."""
    chunks = []
    step = max_length - 1
    for text in _code_raw_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), step):
            chunks.append(_Encoded([tokenizer.bos_token_id] + ids[start : start + step], 1))
    return chunks


def _training_documents(config: ToyConfig, tokenizer: PreTrainedTokenizerFast) -> Iterator[_Encoded]:
    """Endless, seeded stream of encoded training documents."""
    if config.domain == "math":
        for example in _math_training_documents(config.seed):
            yield _encode(tokenizer, example, config.max_length)
        return
    pairs = [_encode(tokenizer, example, config.max_length) for example in code_corpus()["train"]]
    raw = _raw_chunks(tokenizer, config.max_length) if config.raw_text_fraction > 0 else []
    rng = random.Random(f"toy-code-stream-{config.seed}")
    while True:  # epochs over the pairs, with raw chunks mixed in at the configured rate
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for index in order:
            while raw and rng.random() < config.raw_text_fraction:
                yield rng.choice(raw)
            yield pairs[index]


def _collate(group: Sequence[_Encoded], pad_id: int,
             loss_on_prompt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); padding, and the prompt unless
    `loss_on_prompt`, carry no loss."""
    width = max(len(d.ids) for d in group)
    input_ids = torch.full((len(group), width), pad_id)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    labels = torch.full((len(group), width), -100)
    for row, document in enumerate(group):
        ids = torch.tensor(document.ids)
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
        first_label = 1 if loss_on_prompt else document.prompt_length
        labels[row, first_label : len(ids)] = ids[first_label:]
    return input_ids, mask, labels


def _batches(documents: Iterator[_Encoded], batch_size: int, pad_id: int,
             loss_on_prompt: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Training batches. Documents are grouped by length within a window of 8 batches so that
    little compute goes to padding."""
    while True:
        window = sorted((next(documents) for _ in range(8 * batch_size)), key=lambda d: len(d.ids))
        for start in range(0, len(window), batch_size):
            yield _collate(window[start : start + batch_size], pad_id, loss_on_prompt)


def _learning_rate(config: ToyConfig, progress: float) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    return config.learning_rate * warmup_cosine(progress, config.warmup_fraction, floor=0.1)


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


@dataclass
class TrainingReport:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time: wall time on an otherwise idle machine x threads
    final_loss: float = float("nan")
    stopped_early: bool = False


def train_teacher(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                  config: ToyConfig) -> TrainingReport:
    """Train `model` (on whatever device it is) on `config.train_tokens` tokens of the domain's
    training stream, printing a progress line (loss, throughput, ETA) every
    `config.progress_every` of the budget."""
    device = next(model.parameters()).device
    documents = _training_documents(config, tokenizer)
    batches = _batches(documents, config.batch_size, tokenizer.pad_token_id, config.loss_on_prompt)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
    )
    report = TrainingReport()
    start, cpu_start = time.monotonic(), time.process_time()
    next_report = config.progress_every
    smoothed = None
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        while report.tokens < config.train_tokens:
            input_ids, mask, labels = next(batches)
            progress = report.tokens / config.train_tokens
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, progress)
            loss = model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                use_cache=False,  # no generation here: building a KV cache is wasted work
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            report.steps += 1
            report.tokens += int(mask.sum())
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            report.seconds = time.monotonic() - start
            done = report.tokens / config.train_tokens
            if done >= next_report or done >= 1.0:
                next_report += config.progress_every
                eta = report.seconds * (1 - min(done, 1.0)) / max(done, 1e-9)
                print(f"[toy-{config.domain}] {min(done, 1.0):4.0%} step {report.steps} "
                      f"tokens {report.tokens / 1e6:.2f}M loss {smoothed:.3f} "
                      f"{report.tokens / max(report.seconds, 1e-9):.0f} tok/s "
                      f"elapsed {_format_seconds(report.seconds)} eta {_format_seconds(eta)}",
                      file=sys.stderr, flush=True)
            if config.max_seconds is not None and report.seconds > config.max_seconds:
                report.stopped_early = True
                break
    report.cpu_seconds = time.process_time() - cpu_start
    report.final_loss = float(smoothed) if smoothed is not None else float("nan")
    model.eval()
    return report


def heldout_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast,
                 examples: Sequence[ToyPrompt], max_length: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token (EOS included) of `examples`, prompts given."""
    from cllm.evaluation import heldout_loss as answer_loss  # cllm.evaluation imports this module

    encoded = [_encode(tokenizer, example, max_length) for example in examples]
    prompts = [item.ids[: item.prompt_length] for item in encoded]
    answers = [item.ids[item.prompt_length :] for item in encoded]
    return answer_loss(model, prompts, answers, batch_size=batch_size) or 0.0


# ---------------------------------------------------------------------------------------------
# Cache and loading
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$CLLM_CACHE`, else `~/.cache/cllm`."""
    return Path(os.environ.get("CLLM_CACHE") or Path.home() / ".cache" / "cllm")


def teacher_dir(domain: str | None = None, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"toy-{TOY_VERSION}" / _resolve_domain(domain)


def _read_build_info(directory: Path) -> dict | None:
    """The build record of a complete teacher in `directory`, or None if there is none."""
    try:
        return json.loads((directory / BUILD_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def build_toy(config: ToyConfig, directory: Path, device: torch.device | str | None = None) -> dict:
    """Train a teacher for `config` on `device` (default: CUDA when present, else CPU) and save
    it (model, tokenizer, build record) to `directory`. Everything is written to a temporary
    sibling first and renamed into place, so a crash never leaves a half-written teacher that a
    later load would take as complete."""
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        print(f"[toy-{config.domain}] building the toy teacher in {directory} "
              f"({config.train_tokens / 1e6:.2f}M tokens); this happens once", file=sys.stderr, flush=True)
        tokenizer = train_tokenizer(config)
        model = new_teacher(config, tokenizer).to(device if device is not None else default_device())
        report = train_teacher(model, tokenizer, config)
        heldout = toy_prompts("heldout", config.domain, limit=config.eval_prompts, seed=config.seed)
        loss = heldout_loss(model, tokenizer, heldout, config.max_length)
        model.to("cpu")
    finally:
        torch.set_num_threads(threads)
    info = {
        "toy_version": TOY_VERSION,
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": asdict(report),
        "heldout_answer_loss": loss,
        "build_seconds": time.monotonic() - started,
        "device": str(device if device is not None else default_device()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[toy-{config.domain}] built in {_format_seconds(info['build_seconds'])}: "
          f"{info['parameters'] / 1e6:.2f}M parameters, held-out answer loss {loss:.3f}",
          file=sys.stderr, flush=True)
    return info


def load_toy(domain: str | None = None, config: ToyConfig | None = None,
             cache_dir: str | Path | None = None,
             device: torch.device | str | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer) of a toy domain's teacher (`DEFAULT_DOMAIN` when None), in eval mode on
    CPU; `device` only says where a missing teacher is trained. Without `config`, any complete
    cached teacher of the domain is reused, else the default one is built. With `config`, the
    cached teacher is reused only if it was built from exactly that config, else rebuilt."""
    domain = _resolve_domain(config.domain if config is not None and domain is None else domain)
    if config is not None and config.domain != domain:
        raise ValueError(f"config is for domain {config.domain!r}, not {domain!r}")
    directory = teacher_dir(domain, cache_dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f"{domain}.lock")):
        info = _read_build_info(directory)
        wanted = config if config is not None else default_config(domain)
        if info is None or (config is not None and info.get("config") != asdict(wanted)):
            build_toy(wanted, directory, device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    return model.eval(), tokenizer


def toy_build_info(domain: str | None = None, cache_dir: str | Path | None = None) -> dict | None:
    """The build record (config, size, time, held-out loss) of the cached teacher, if built."""
    return _read_build_info(teacher_dir(domain, cache_dir))

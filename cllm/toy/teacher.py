"""Toy teachers: tiny Llama models that the project trains itself, so everything runs offline.

Each domain gets a byte-level BPE tokenizer trained on its own training split and a small
`LlamaForCausalLM` trained from scratch with a fixed seed and token budget (minutes on a CPU).
A teacher is built on first use and cached under `$CLLM_CACHE` (default `~/.cache/cllm`) in
`toy-<version>/<domain>/` (`TOY_VERSIONS`); a file lock stops two processes from building it at once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cllm.device import default_device
from cllm.metrics import IGNORE, answer_loss, right_pad
from cllm.progress import Progress, format_seconds
from cllm.schedule import warmup_cosine
from cllm.toy import DEFAULT_DOMAIN, DOMAINS, ToyPrompt, resolve_domain, toy_version
from cllm.toy.chat import CHAT_TEMPLATE, IM_END, IM_START
from cllm.toy.processes import run_ranks, sum_across_processes
from cllm.toy.tasks import GENERATED_TASKS, toy_prompts

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BUILD_INFO_FILE = "toy_build.json"


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
    loss_on_prompt: bool = False  # the prompt's `GeneratedTask.labelled_prompt` carries loss too
    # On a CPU, single-threaded data-parallel processes train 1.3x faster than one process on as
    # many threads (docs/results.md#toy-teachers), to the same teacher (summed whole-batch gradients).
    processes: int = 2
    threads: int = 1  # per process
    # held-out evaluation recorded with the build
    eval_prompts: int = 200

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown toy domain {self.domain!r}; choose from {DOMAINS}")
        if not 1 <= self.processes <= self.batch_size or self.threads < 1:
            raise ValueError(f"processes must be in 1..batch_size ({self.batch_size}) and threads at least 1, "
                             f"got {self.processes} and {self.threads}")


def default_config(domain: str | None = None) -> ToyConfig:
    """The configuration of the teacher `load_toy(domain)` builds."""
    domain = resolve_domain(domain)
    if domain == "math":
        # Hidden 128 trains 1.4x faster per token than 192. Batch 16 and 5M tokens master the last
        # subtraction with a margin that its CLLM keeps; at batch 32 and 4M it did not (docs/results.md#toy-math).
        return ToyConfig(domain="math", hidden_size=128, intermediate_size=384, num_heads=8, batch_size=16,
                         learning_rate=3e-3, train_tokens=5_000_000)
    if domain == "sql":
        # A larger vocabulary than math's makes every table, column and
        # keyword one token, as in the schema so in the query, which keeps copying them simple.
        # Digits stay split as for math, as BPE-merged numbers are copied as near neighbours, and 8
        # heads copy numbers with far fewer errors than 4 at nearly the same cost
        # (docs/results.md#toy-sql).
        return ToyConfig(domain="sql", vocab_size=768, hidden_size=192, intermediate_size=512, num_heads=8,
                         batch_size=32, train_tokens=3_000_000)
    if domain == "chat":
        # The earlier assistant replies carry loss as the answer does (the model's own turns, as
        # multi-turn fine-tuning trains them), the user's and system's turns none: with the loss on
        # the whole prompt, the teacher learned the frequencies of the user's random items instead
        # of copying them. Accuracy follows the tokens seen, so the model is narrower than SQL's
        # (1.4x faster per token). Batch 16 halves the held-out loss of batch 32 for the same
        # tokens (docs/results.md#toy-chat). Conversations reach about 210 tokens.
        return ToyConfig(domain="chat", vocab_size=768, hidden_size=128, intermediate_size=384, num_heads=8,
                         batch_size=16, learning_rate=4e-3, train_tokens=10_000_000, max_length=320)
    # SQL's size. The prompt carries loss: its copies of names and constants teach copying them. Its
    # examples carry none: their random inputs are noise no model predicts, and with them 1 build in 6
    # missed the constants of arithmetic phrases; without, none in 6 (docs/results.md#toy-code).
    return ToyConfig(domain="code", vocab_size=768, hidden_size=192, intermediate_size=512, num_heads=8,
                     batch_size=16, train_tokens=7_500_000, max_length=384, loss_on_prompt=True)


# -- tokenizer ---------------------------------------------------------------------------------


def _tokenizer_corpus(config: ToyConfig) -> list[str]:
    stream = GENERATED_TASKS[config.domain].training_documents(config.seed)
    examples = (next(stream) for _ in range(config.tokenizer_corpus_docs))
    return [example.prompt + example.answer for example in examples]


def train_tokenizer(config: ToyConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the domain's training stream, digits split one by one, with `<pad>`,
    `<bos>`, `<eos>`; encoding a text prepends `<bos>`. Chat's tokenizer is ChatML's instead, as
    Qwen2's: `<pad>`, `<|im_start|>` and `<|im_end|>` (its EOS, which ends every turn), no BOS (a
    rendered conversation starts with `<|im_start|>`), and the chat template that renders the
    conversations (`cllm.toy.chat.CHAT_TEMPLATE`), saved in its tokenizer config."""
    chat = config.domain == "chat"
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # One token per digit keeps arithmetic and copying numbers learnable: no arbitrary merges.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[PAD, IM_START, IM_END] if chat else [PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(config), trainer=trainer)
    if chat:
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token=IM_END, pad_token=PAD, additional_special_tokens=[IM_START],
            model_max_length=config.max_length, padding_side="left", chat_template=CHAT_TEMPLATE,
        )
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=config.max_length, padding_side="left",
    )


# -- training ----------------------------------------------------------------------------------


def new_teacher(config: ToyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by `config`, seeded by `config.seed`."""
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LlamaForCausalLM(llama)


@dataclass
class _Encoded:
    ids: list[int]
    prompt_length: int  # tokens (bos included); the prompt carries no loss but in `prompt_loss_spans`
    # [start, end) spans of the prompt that carry loss as the answer does: with loss_on_prompt, the
    # task's `labelled_prompt`; without, a chat prompt's earlier assistant replies (content and
    # <|im_end|>), which are the model's own turns.
    prompt_loss_spans: tuple[tuple[int, int], ...] = ()


def _reply_spans(tokenizer: PreTrainedTokenizerFast, ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Where the assistant replies of a ChatML-rendered conversation lie: from after each
    `<|im_start|>assistant\n` to its `<|im_end|>`, included (a generation prompt has none)."""
    opening = tokenizer(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    spans = []
    for start in range(len(ids) - len(opening) + 1):
        if list(ids[start : start + len(opening)]) == opening and im_end in ids[start + len(opening) :]:
            content = start + len(opening)
            spans.append((content, ids.index(im_end, content) + 1))
    return tuple(spans)


def _encode(tokenizer: PreTrainedTokenizerFast, example: ToyPrompt, max_length: int,
            loss_on_prompt: bool = False) -> _Encoded:
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_length]
    if loss_on_prompt:
        labelled = GENERATED_TASKS[example.domain].labelled_prompt(example.prompt)
        spans = ((1, len(tokenizer(labelled)["input_ids"])),)  # the first token is never predicted
    else:
        spans = _reply_spans(tokenizer, prompt_ids) if example.messages else ()
    return _Encoded(ids, len(prompt_ids), spans)


def _training_documents(config: ToyConfig, tokenizer: PreTrainedTokenizerFast) -> Iterator[_Encoded]:
    """Endless, seeded stream of encoded training documents."""
    for example in GENERATED_TASKS[config.domain].training_documents(config.seed):
        yield _encode(tokenizer, example, config.max_length, config.loss_on_prompt)


def _batches(documents: Iterator[_Encoded], batch_size: int,
             pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask, labels); padding, and the prompt but for its
    `prompt_loss_spans`, carry no loss. Documents are grouped by length within a window of 8
    batches so that little compute goes to padding."""
    while True:
        window = sorted((next(documents) for _ in range(8 * batch_size)), key=lambda d: len(d.ids))
        for start in range(0, len(window), batch_size):
            group = window[start : start + batch_size]
            input_ids, mask, labels = right_pad([d.ids for d in group], pad_id,
                                                label_starts=[d.prompt_length for d in group])
            for row, document in enumerate(group):
                for begin, end in document.prompt_loss_spans:
                    end = min(end, len(document.ids))  # a truncated document's padding stays unlabelled
                    labels[row, begin:end] = input_ids[row, begin:end]
            yield input_ids, mask, labels


@dataclass
class TrainingReport:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of every training process: wall time on idle cores x cores
    final_loss: float = float("nan")
    stopped_early: bool = False


def train_teacher(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, config: ToyConfig,
                  rank: int = 0, world_size: int = 1) -> TrainingReport:
    """Train `model` (on whatever device it is) on `config.train_tokens` tokens of the domain's
    training stream, with one progress line (loss, throughput, ETA). With `world_size` > 1 (a
    process group of that size is initialised), this process trains rows `rank::world_size` of
    every batch; every process reads the same stream and gradients are summed, so each step is
    the whole batch's. Only rank 0 prints."""
    device = next(model.parameters()).device
    batches = _batches(_training_documents(config, tokenizer), config.batch_size, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay,
    )
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    report = TrainingReport()
    progress = Progress(f"[toy-{config.domain}] training", config.train_tokens, unit="tokens") if rank == 0 else None
    start, cpu_start = time.monotonic(), time.process_time()
    smoothed = None
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        while report.tokens < config.train_tokens:
            input_ids, mask, labels = next(batches)
            # Linear warmup, then cosine decay to a tenth of the peak.
            multiplier = warmup_cosine(report.tokens / config.train_tokens, config.warmup_fraction, floor=0.1)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * multiplier
            # The whole batch's mean: each process's sum over its rows, divided by every row's count.
            predicted = int((labels[:, 1:] != IGNORE).sum())
            rows = slice(rank, None, world_size)
            width = int(mask[rows].sum(dim=1).max())
            loss = model(
                input_ids=input_ids[rows, :width].to(device), attention_mask=mask[rows, :width].to(device),
                labels=labels[rows, :width].to(device), num_items_in_batch=max(predicted, 1),
                use_cache=False,  # no generation here: building a KV cache is wasted work
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            report.seconds = time.monotonic() - start
            out_of_time = config.max_seconds is not None and report.seconds > config.max_seconds
            loss, out_of_time = loss.detach(), torch.tensor(float(out_of_time))
            if world_size > 1:  # every process stops at the same step when any is out of time
                loss, out_of_time = sum_across_processes(parameters, torch.stack([loss, out_of_time]))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            report.steps += 1
            report.tokens += int(mask.sum())
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            if progress is not None:
                progress.update(min(report.tokens, config.train_tokens), f"step {report.steps} loss {smoothed:.3f}")
            if out_of_time:
                report.stopped_early = True
                break
    if progress is not None:
        progress.close()
    report.cpu_seconds = time.process_time() - cpu_start
    report.final_loss = float(smoothed) if smoothed is not None else float("nan")
    model.eval()
    return report


def _train_process(rank: int, rendezvous: str) -> None:
    """One data-parallel training process, run as its own interpreter by `_train_in_processes`,
    which left the config and the tokenizer in `rendezvous`; rank 0 leaves the trained weights and
    the report there."""
    config = ToyConfig(**json.loads(Path(rendezvous, "config.json").read_text()))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(rendezvous)
    torch.set_num_threads(config.threads)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}/store", rank=rank,
                                         world_size=config.processes)
    try:
        model = new_teacher(config, tokenizer)
        report = train_teacher(model, tokenizer, config, rank, config.processes)
        total_cpu = torch.tensor([report.cpu_seconds], dtype=torch.float64)
        torch.distributed.all_reduce(total_cpu)
        report.cpu_seconds = float(total_cpu.item())
        if rank == 0:
            torch.save(model.state_dict(), Path(rendezvous, "model.pt"))
            Path(rendezvous, "report.json").write_text(json.dumps(asdict(report)))
    finally:
        torch.distributed.destroy_process_group()


def _train_in_processes(config: ToyConfig,
                        tokenizer: PreTrainedTokenizerFast) -> tuple[LlamaForCausalLM, TrainingReport]:
    """Train a new teacher in `config.processes` CPU processes; (the model, the report)."""
    with tempfile.TemporaryDirectory(prefix="toy-teacher-") as rendezvous:
        Path(rendezvous, "config.json").write_text(json.dumps(asdict(config)))
        tokenizer.save_pretrained(rendezvous, save_jinja_files=False)
        run_ranks("cllm.toy.teacher", "_train_process", config.processes, rendezvous)
        model = new_teacher(config, tokenizer)
        model.load_state_dict(torch.load(Path(rendezvous, "model.pt"), weights_only=True))
        report = TrainingReport(**json.loads(Path(rendezvous, "report.json").read_text()))
    return model.eval(), report


def heldout_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast,
                 examples: Sequence[ToyPrompt], max_length: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token (EOS included) of `examples`, prompts given."""
    encoded = [_encode(tokenizer, example, max_length) for example in examples]
    prompts = [item.ids[: item.prompt_length] for item in encoded]
    answers = [item.ids[item.prompt_length :] for item in encoded]
    return answer_loss(model, prompts, answers, batch_size=batch_size) or 0.0


# -- cache and loading -------------------------------------------------------------------------


def cache_root() -> Path:
    """`$CLLM_CACHE`, else `~/.cache/cllm`."""
    return Path(os.environ.get("CLLM_CACHE") or Path.home() / ".cache" / "cllm")


def teacher_dir(domain: str | None = None, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / f"toy-{toy_version(domain)}" / resolve_domain(domain)


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
    device = torch.device(device) if device is not None else default_device()
    threads = torch.get_num_threads()
    parallel = device.type == "cpu" and config.processes > 1  # one accelerator: one process
    torch.set_num_threads(config.threads * (config.processes if parallel else 1))
    try:
        print(f"[toy-{config.domain}] building the toy teacher in {directory} "
              f"({config.train_tokens / 1e6:.2f}M tokens); this happens once", file=sys.stderr, flush=True)
        tokenizer = train_tokenizer(config)
        if parallel:
            model, report = _train_in_processes(config, tokenizer)
        else:
            model = new_teacher(config, tokenizer).to(device)
            report = train_teacher(model, tokenizer, config)
        heldout = toy_prompts("heldout", config.domain, limit=config.eval_prompts, seed=config.seed)
        loss = heldout_loss(model, tokenizer, heldout, config.max_length)
        model.to("cpu")
    finally:
        torch.set_num_threads(threads)
    info = {
        "toy_version": toy_version(config.domain),
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": asdict(report),
        "heldout_answer_loss": loss,
        "build_seconds": time.monotonic() - started,
        "device": str(device),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
    try:
        model.save_pretrained(staging)
        # The chat template inside tokenizer_config.json, where every transformers release reads it.
        tokenizer.save_pretrained(staging, save_jinja_files=False)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[toy-{config.domain}] built in {format_seconds(info['build_seconds'])}: "
          f"{info['parameters'] / 1e6:.2f}M parameters, held-out answer loss {loss:.3f}",
          file=sys.stderr, flush=True)
    return info


def ensure_toy(domain: str | None = None, config: ToyConfig | None = None, cache_dir: str | Path | None = None,
               device: torch.device | str | None = None) -> Path:
    """The directory of a toy domain's teacher (`DEFAULT_DOMAIN` when None), built first if
    needed; `device` only says where a missing teacher is trained. Without `config`, any
    complete cached teacher of the domain is reused, else the default one is built. With
    `config`, the cached teacher is reused only if it was built from exactly that config."""
    domain = resolve_domain(config.domain if config is not None and domain is None else domain)
    if config is not None and config.domain != domain:
        raise ValueError(f"config is for domain {config.domain!r}, not {domain!r}")
    directory = teacher_dir(domain, cache_dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f"{domain}.lock")):
        info = _read_build_info(directory)
        wanted = config if config is not None else default_config(domain)
        if info is None or (config is not None and info.get("config") != asdict(wanted)):
            build_toy(wanted, directory, device)
    return directory


def load_toy(domain: str | None = None, config: ToyConfig | None = None,
             cache_dir: str | Path | None = None,
             device: torch.device | str | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer) of a toy domain's teacher (see `ensure_toy`), in eval mode on CPU."""
    directory = ensure_toy(domain, config, cache_dir, device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    return model.eval(), tokenizer


def toy_build_info(domain: str | None = None, cache_dir: str | Path | None = None) -> dict | None:
    """The build record (config, size, time, held-out loss) of the cached teacher, if built."""
    return _read_build_info(teacher_dir(domain, cache_dir))

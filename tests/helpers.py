"""Helpers shared by several test modules: small tokenizers, free ports, trajectory rows, a tiny
checkpoint on disk, and greedy references (Hugging Face `generate`, `cllm.ar_generate`)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from cllm import ar_generate, load_model, tiny_model
from cllm.data import TrajectoryRow
from cllm.trajectory import CollectConfig
from cllm.trajectory import trajectory_rows as collect_rows

PAD = 0
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_ray_processes(temp_dir: str) -> int:
    """Kill the Ray cluster whose nodes were started with `--temp-dir temp_dir`: every process
    whose command line names that directory, and their descendants (workers rename themselves
    `ray::...`). Unlike `ray stop`, which kills every Ray process on the machine, this leaves other
    Ray instances alone. Returns how many processes were killed."""
    killed = 0
    for _ in range(5):  # processes starting while we kill: look again until nothing is left
        found = _kill_marked(temp_dir)
        if not found:
            return killed
        killed += found
    return killed


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), command)
    return table


def processes_named(text: str) -> list[int]:
    """The pids whose command line contains `text`. Ray names an actor's worker process after
    it: a Serve replica of deployment D in application A runs as `ray::ServeReplica:A:D`."""
    return sorted(pid for pid, (_, command) in process_table().items() if text in command and pid != os.getpid())


def _kill_marked(temp_dir: str) -> int:
    table = process_table()
    parents = {pid: parent for pid, (parent, _) in table.items()}
    marked = {pid for pid, (_, command) in table.items() if temp_dir in command and pid != os.getpid()}
    grew = True
    while grew:
        descendants = {pid for pid, parent in parents.items() if parent in marked} - marked
        marked |= descendants
        grew = bool(descendants)
    for pid in marked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if marked:
        import time

        time.sleep(0.5)
    return len(marked)


def wait_for_job_agent(address: str, environment: dict[str, str], timeout: float = 180) -> None:
    """Return once the cluster at `address` accepts a job: its job agent starts some seconds after
    `ray start` returns (longer on a loaded machine), and a submission before that fails."""
    import subprocess
    import sys
    import time

    ray = str(Path(sys.executable).with_name("ray"))
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run([ray, "job", "submit", "--address", address, "--no-wait", "--", "true"],
                               capture_output=True, text=True, env=environment)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job agent at {address} did not come up:\n{probe.stderr[-2000:]}")
        time.sleep(2)


def save_word_model(directory: Path, vocab_size: int = 64) -> Path:
    """A tiny Llama with a word-level tokenizer over its ids (`w1` ... `w63`, `<pad>` = 0 also
    ending a text), saved as a local Hugging Face model directory."""
    from tokenizers import pre_tokenizers

    from cllm import tiny_model

    vocabulary = {"<pad>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<pad>")
    tiny_model("llama", vocab_size=vocab_size, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (100 ids, fits a 128-token tiny model) that prepends <bos>."""
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def row(prompt_id: str, block_index: int, prompt_length: int, prefix_ids: list[int], states: list[list[int]],
        fixed_length: int | None = None, label_ids: list[int] | None = None) -> TrajectoryRow:
    """A trajectory row with defaults for the fields tests rarely care about."""
    n_token = len(states[0])
    return TrajectoryRow(
        prompt_id=prompt_id, block_index=block_index, prompt_length=prompt_length, prefix_ids=prefix_ids,
        states=states, eos=False, label_ids=label_ids, model="tiny", n_token=n_token,
        fixed_length=n_token if fixed_length is None else fixed_length,
    )


def trajectory_rows(model, prompts: list[list[int]], n_token: int, max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[TrajectoryRow]:
    """Rows of the trajectory schema from the project's collector, one per (prompt, block), with
    the reversed prompt as a made-up label."""
    batch = [{"prompt_id": f"p{index}", "prompt_ids": prompt, "label_ids": list(reversed(prompt))}
             for index, prompt in enumerate(prompts)]
    config = CollectConfig(n_token=n_token, max_new_tokens=max_new_tokens, min_loop_tokens=0)
    stop_ids = frozenset() if eos_token_id is None else frozenset([eos_token_id])
    result = collect_rows(model, batch, "tiny", config, stop_ids, PAD)
    assert not result.rejected, result.rejected
    return result.rows


def hand_rows() -> list[TrajectoryRow]:
    """Two blocks of n=3 with different prefix lengths and numbers of states; the second is a
    last block padded after its first 2 positions."""
    return [
        row("a", 0, 4, [5, 6, 7, 8], [[9, 1, 2], [9, 4, 2], [9, 4, 3]], label_ids=[11, 12]),
        row("b", 1, 3, [20, 21, 22, 23, 24, 25], [[30, 1, 1], [30, 31, PAD]], fixed_length=2, label_ids=[13]),
    ]


def hf_greedy(model, input_ids, mask, max_new_tokens, eos_token_id=None) -> list[list[int]]:
    """Hugging Face `generate`, one unpadded row at a time."""
    outputs = []
    for ids, row_mask in zip(input_ids, mask):
        prompt = ids[row_mask.bool()][None]
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id if eos_token_id is not None else 0,
        )[0, prompt.shape[1] :].tolist()
        if eos_token_id is not None and eos_token_id in generated:  # generate pads after EOS
            generated = generated[: generated.index(eos_token_id) + 1]
        outputs.append(generated)
    return outputs


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer built offline: printable ASCII pieces, `▁` for spaces, and the 256
    `<0xXX>` byte tokens for everything else, so every non-ASCII character (accents, CJK, emoji)
    is spelled as 2 to 4 byte tokens, each of which alone decodes to U+FFFD."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += ["▁"] + [chr(code) for code in range(33, 127)] + ["▁t", "he", "▁the"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TINY_CONTEXT = 4096


def save_tiny_checkpoint(path: str, with_eos: bool = True, context: int = TINY_CONTEXT) -> None:
    """A tiny random Llama and a matching word-level tokenizer (`<unk>`, `<pad>`, `<eos>`, then
    words t3 ... t127), saved like any Hugging Face checkpoint. Without EOS, every generation
    runs to max_tokens (the capacity tests need requests that surely last)."""
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    special_tokens = {
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        **({"eos_token": "<eos>"} if with_eos else {}),
    }
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    model = tiny_model("llama", vocab_size=128, seed=1, max_position_embeddings=context)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


class Reference:
    """Greedy AR text of a saved model, computed in the test's process."""

    def __init__(self, path: str):
        self.model, self.tokenizer = load_model(path, device="cpu")

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompt_ids: list[int], max_tokens: int, with_eos: bool = True) -> list[int]:
        output = ar_generate(
            self.model,
            torch.tensor([prompt_ids]),
            max_new_tokens=max_tokens,
            eos_token_id=self.tokenizer.eos_token_id if with_eos else None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return output.new_tokens[0]

    def text(self, prompt: str, max_tokens: int) -> str:
        return self.tokenizer.decode(self.generate(self.ids(prompt), max_tokens), skip_special_tokens=True)

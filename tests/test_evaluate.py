"""Evaluation on tiny random models: the report is well formed, its numbers are consistent, and
the plots are real PNG files."""

from __future__ import annotations

import json
import random

import pytest

from cllm.evaluation import (
    Contender,
    DecodeSettings,
    ModelEvaluation,
    compare_decoding,
    report_rows,
    score_task,
    task_metric,
)
from cllm.hf import tiny_model
from cllm.metrics import agreement, answer_loss, common_prefix_fraction
from cllm.report import (
    OUTPUTS_JSONL,
    REPORT_JSON,
    REPORT_MD,
    SPEEDUP_PNG,
    TPF_HISTOGRAM_PNG,
    TRAJECTORY_PNG,
    converged_mask,
    visible_token,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_FIELDS = {
    "model", "decoding", "n_token", "tokens_per_forward", "tokens_per_second", "speedup",
    "accuracy", "agreement_with_baseline", "heldout_loss", "fast_forwarded_per_block",
    "stationary_per_block",
}
VOCAB = 64


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 9))] for _ in range(count)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two tiny models (a 'teacher' baseline and another one) evaluated on the same prompts, and
    the report written from them."""
    prompts = _prompts(4)
    answers = [[(token * 7) % VOCAB for token in prompt][:4] for prompt in prompts]
    settings = DecodeSettings(n_tokens=[4, 8], max_new_tokens=12, batch_size=2, repeats=2)
    contenders = [Contender(name, tiny_model("llama", vocab_size=VOCAB, seed=seed), prompts)
                  for name, seed in (("teacher", 0), ("other", 1))]
    runs = compare_decoding(contenders, settings)
    evaluations = []
    for contender in contenders:
        evaluation = ModelEvaluation(contender.name, runs[contender.name], token_text=lambda t: f"t{t}")
        evaluation.heldout_loss = answer_loss(contender.model, prompts, answers)
        # A made-up task metric on made-up texts: an output is right when it starts with an even token.
        score_task(evaluation, lambda ids: " ".join(f"t{t}" for t in ids),
                   lambda texts: [int(text.split()[0][1:]) % 2 == 0 for text in texts])
        evaluations.append(evaluation)
    output = tmp_path_factory.mktemp("report")
    rows = write_report(evaluations, "teacher", output, settings={"limit": 4})
    return evaluations, rows, output


def test_report_json_is_well_formed(evaluated):
    _, _, output = evaluated
    report = json.loads((output / REPORT_JSON).read_text())
    assert report["baseline"] == "teacher"
    assert report["settings"] == {"limit": 4}
    assert len(report["rows"]) == 2 * 3  # two models x (AR, Jacobi n=4, Jacobi n=8)
    assert len((output / OUTPUTS_JSONL).read_text().splitlines()) == 2 * 3 * 4  # a line per row and prompt
    for row in report["rows"]:
        assert REPORT_FIELDS <= set(row)
        assert row["decoding"] in ("ar", "jacobi")
    keys = [(r["model"], r["decoding"], r["n_token"]) for r in report["rows"]]
    assert keys == [(m, d, n) for m in ("teacher", "other") for d, n in (("ar", 1), ("jacobi", 4), ("jacobi", 8))]
    table = (output / REPORT_MD).read_text()
    assert table.count("\n| teacher |") == 3 and table.count("\n| other |") == 3


def test_numbers_are_consistent(evaluated):
    evaluations, rows, _ = evaluated
    reference = rows[0]
    assert (reference.model, reference.decoding) == ("teacher", "ar")
    assert reference.speedup == pytest.approx(1.0)
    for row in rows:
        assert row.tokens_per_forward == pytest.approx(row.new_tokens / row.forwards)
        assert row.tokens_per_second == pytest.approx(row.new_tokens / row.seconds)
        assert row.speedup == pytest.approx(row.tokens_per_second / reference.tokens_per_second)
        assert row.new_tokens == 4 * 12  # no EOS: every prompt uses the whole budget
        if row.decoding == "ar":
            assert row.tokens_per_forward == 1.0
            assert row.fast_forwarded_per_block == 0.0 and row.stationary_per_block == 0.0
        else:
            assert 1.0 <= row.tokens_per_forward <= row.n_token
    for evaluation in evaluations:
        ar = evaluation.run("ar", 1)
        for run in evaluation.runs:
            assert agreement(run.outputs, ar.outputs) == (1.0, 1.0)  # Jacobi is lossless
        model_rows = [r for r in rows if r.model == evaluation.name]
        assert len({r.heldout_loss for r in model_rows}) == 1
        assert len({r.accuracy for r in model_rows}) == 1  # same outputs, same score
    for row in rows:
        if row.model == "teacher":
            assert row.agreement_with_baseline == 1.0 and row.common_prefix_with_baseline == 1.0
        else:  # a different random model almost surely says something else
            assert row.agreement_with_baseline < 1.0


def test_plots_are_png_files(evaluated):
    _, _, output = evaluated
    for name in (SPEEDUP_PNG, TPF_HISTOGRAM_PNG, TRAJECTORY_PNG):
        data = (output / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 1000, name


def test_trajectory_example_ends_at_its_fixed_point(evaluated):
    evaluations, _, _ = evaluated
    run = evaluations[1].run("jacobi", 8)
    states = run.example_trajectory
    assert states is not None and all(len(state) == 8 for state in states)
    mask = converged_mask(states)
    assert all(mask[-1])
    assert mask[0][0]  # the first token of a block is verified from the start


def test_common_prefix_and_agreement():
    assert common_prefix_fraction([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert common_prefix_fraction([1, 2], [1, 2, 3, 4]) == 0.5
    assert common_prefix_fraction([], []) == 1.0
    assert agreement([[1, 2], [3]], [[1, 2], [4]]) == (0.5, 0.5)
    with pytest.raises(ValueError):
        agreement([[1]], [])


def test_heldout_loss_prefers_the_model_own_greedy_answers():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    prompts = _prompts(4, seed=3)
    settings = DecodeSettings(n_tokens=[4], max_new_tokens=6, batch_size=4)
    greedy = compare_decoding([Contender("m", model, prompts)], settings)["m"][0].outputs
    shuffled = [list(reversed(answer)) for answer in greedy]
    assert answer_loss(model, prompts, greedy) < answer_loss(model, prompts, shuffled)
    assert answer_loss(model, prompts, [None] * 4) is None


def test_unknown_baseline_is_rejected(evaluated):
    evaluations, _, _ = evaluated
    with pytest.raises(ValueError, match="baseline"):
        report_rows(evaluations, "nobody")


def test_task_metric_scores_math_answers_of_toy_sources_only():
    references = ["3 + 4 = 7. The answer is 7.", "The answer is 8."]
    for source in ("toy:heldout", "toy-math:heldout", "toy-math"):
        metric = task_metric(source, references)
        assert metric(["The answer is 7.", "no idea"]) == [True, False]
        assert metric(["The answer is 7.", "The answer is 8."]) == [True, True]
    assert task_metric("toy-code:heldout", references) is None  # code needs its problems' tests
    assert task_metric("data/gsm8k.jsonl", references) is None
    assert task_metric("toy:heldout", [references[0], None]) is None  # a reference is missing


def test_code_is_scored_by_pass_at_1_when_every_prompt_has_tests():
    from cllm.execution import CodeProblem

    right, wrong = "    return a + b\n", "    return a - b\n"
    cut = "    return a + b\ndef add(a, b):\n    return 0\n"  # cut at its stop sequence

    check = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    add = CodeProblem("t/0", "def add(a: int, b: int) -> int:\n", check, "add")
    metric = task_metric("HumanEval.jsonl.gz", [right] * 2, problems=[add, add])
    assert metric([right, wrong]) == [True, False]
    assert metric([cut, right]) == [True, True]
    assert task_metric("HumanEval.jsonl.gz", ["x", "y"], problems=[add, None]) is None


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two tiny random Llamas saved with a small toy-math tokenizer, as `load_model` reads them."""
    from cllm.toy.teacher import ToyConfig, train_tokenizer

    tokenizer = train_tokenizer(ToyConfig(domain="math", vocab_size=300, tokenizer_corpus_docs=300))
    paths = {}
    for name, seed in (("base", 0), ("tuned", 1)):
        directory = tmp_path_factory.mktemp(name)
        model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        paths[name] = str(directory)
    return paths


def test_pipeline_writes_the_report(saved_models, tmp_path, capsys):
    from cllm_pipelines.evaluate import main

    output = tmp_path / "report"
    rows = main([
        "--models", f"base={saved_models['base']}", f"tuned={saved_models['tuned']}",
        "--prompts", "toy-math:heldout", "--limit", "3", "--n-token", "4", "8",
        "--max-new-tokens", "8", "--batch-size", "2", "--output", str(output),
    ])
    report = json.loads((output / REPORT_JSON).read_text())
    assert [(r["model"], r["decoding"], r["n_token"]) for r in report["rows"]] == [
        (m, d, n) for m in ("base", "tuned") for d, n in (("ar", 1), ("jacobi", 4), ("jacobi", 8))
    ]
    assert report["baseline"] == "base" and report["settings"]["limit"] == 3
    for row in report["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0  # toy math has an exact-answer metric
        assert row["heldout_loss"] > 0.0
    assert [r.model for r in rows] == [r["model"] for r in report["rows"]]
    for name in (SPEEDUP_PNG, TPF_HISTOGRAM_PNG, TRAJECTORY_PNG):
        assert (output / name).read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "| tuned | jacobi | 8 |" in printed and str(output / REPORT_MD) in printed


def test_pipeline_writes_every_text_once_per_prompt(saved_models, tmp_path):
    """outputs.jsonl: a line per model, report row and prompt, the texts the accuracy scored, and
    Jacobi's texts equal to AR's (greedy Jacobi is lossless)."""
    from cllm_pipelines.evaluate import main

    output = tmp_path / "report"
    main(["--models", f"base={saved_models['base']}", f"tuned={saved_models['tuned']}",
          "--prompts", "toy-math:heldout", "--limit", "3", "--n-token", "4", "--drafting", "paper", "lookup",
          "--max-new-tokens", "8", "--repeats", "1", "--output", str(output)])
    report = json.loads((output / REPORT_JSON).read_text())
    lines = [json.loads(line) for line in (output / OUTPUTS_JSONL).read_text().splitlines()]
    assert len(report["rows"]) == 2 * 3  # AR, Jacobi n=4, Jacobi+lookup n=4
    assert len(lines) == len(report["rows"]) * 3
    for row in report["rows"]:
        mine = [line for line in lines if (line["model"], line["decoding"], line["n_token"])
                == (row["model"], row["decoding"], row["n_token"])]
        assert len({line["prompt_id"] for line in mine}) == 3
        assert all(line["prompt_id"].startswith("toy-math-") for line in mine)
        assert sum(line["correct"] for line in mine) / 3 == pytest.approx(row["accuracy"])
    for model in ("base", "tuned"):
        ar = {line["prompt_id"]: line["text"] for line in lines if line["model"] == model and line["decoding"] == "ar"}
        assert any(ar.values())  # something was decoded
        for line in lines:
            if line["model"] == model:
                assert line["text"] == ar[line["prompt_id"]], line
                assert 0 <= line["new_tokens"] <= 8


def test_pipeline_rejects_an_unknown_baseline(saved_models, tmp_path):
    from cllm_pipelines.evaluate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--models", f"base={saved_models['base']}", "--baseline", "other"])
    config = parse_args(["--models", f"a={saved_models['base']}", f"b={saved_models['tuned']}", "--baseline", "b"])
    assert config.baseline == "b" and list(config.models) == ["a", "b"]


def test_visible_token():
    assert visible_token(" x\n") == "·x⏎"
    assert visible_token("\x1e") == "\\x1e"
    assert visible_token("abcdefghij") == "abcde…"


def test_contenders_need_the_same_prompts_count():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    settings = DecodeSettings(n_tokens=[4], max_new_tokens=4)
    with pytest.raises(ValueError, match="same"):
        compare_decoding([Contender("a", model, _prompts(2)), Contender("b", model, _prompts(3))], settings)
    with pytest.raises(ValueError):
        compare_decoding([Contender("a", model, [])], settings)


def test_progress_is_reported_per_batch():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    calls = []
    settings = DecodeSettings(n_tokens=[4], max_new_tokens=4, batch_size=2)
    runs = compare_decoding([Contender("a", model, _prompts(5))], settings,
                            on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [len(run.outputs) for run in runs["a"]] == [5, 5]


def test_only_the_timed_prompts_are_timed_and_every_prompt_is_scored():
    """With `timed_prompts`, speed comes from the first prompts at the timed batch size; the rest
    are decoded in larger untimed batches, with the same outputs and forwards as all timed."""
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    prompts = _prompts(7)
    calls = []
    everything = DecodeSettings(n_tokens=[4], max_new_tokens=8, batch_size=1)
    subset = DecodeSettings(n_tokens=[4], max_new_tokens=8, batch_size=1, timed_prompts=2, untimed_batch_size=4)
    timed_all = compare_decoding([Contender("a", model, prompts)], everything)["a"]
    timed_two = compare_decoding([Contender("a", model, prompts)], subset,
                                 on_batch=lambda done, total: calls.append((done, total)))["a"]
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 timed batches of 1, then 5 prompts in 4 + 1
    for all_run, subset_run in zip(timed_all, timed_two):
        assert subset_run.outputs == all_run.outputs
        assert [row.forwards for row in subset_run.per_prompt] == [row.forwards for row in all_run.per_prompt]
        assert subset_run.timed_new_tokens == sum(map(len, subset_run.outputs[:2]))
        assert 0 < subset_run.seconds and subset_run.tokens_per_second > 0
    with pytest.raises(ValueError, match="timed_prompts"):
        compare_decoding([Contender("a", model, prompts)], DecodeSettings(n_tokens=[4], timed_prompts=0))


def test_drafting_variants_get_a_row_each_with_the_same_outputs(tmp_path):
    """Each drafting variant is a row per block size, with outputs identical to AR and its
    wall-clock compared with the paper's rule at the same n."""
    from cllm.drafts import PAPER, DecodingOptions, variant

    everything = DecodingOptions(lookup=True, recycle_candidates=2, blocks_in_flight=2, next_block_share=0.5)
    drafting = {name: variant(name, everything) for name in ("paper", "lookup", "recycle", "multi-block", "all")}
    assert drafting["paper"] == PAPER and drafting["all"] == everything
    settings = DecodeSettings(n_tokens=[4], max_new_tokens=12, batch_size=2, drafting=drafting)
    contender = Contender("teacher", tiny_model("gpt2", vocab_size=VOCAB, seed=0), _prompts(4))
    evaluation = ModelEvaluation("teacher", compare_decoding([contender], settings)["teacher"])
    rows = report_rows([evaluation], "teacher")
    assert [row.decoding for row in rows] == [
        "ar", "jacobi", "jacobi+lookup", "jacobi+recycle", "jacobi+multi-block", "jacobi+all"
    ]
    assert all(row.agreement_with_baseline == 1.0 for row in rows)
    plain = rows[1]
    assert plain.speedup_over_jacobi is None and plain.fed_per_iteration > 1
    for row in rows[2:]:
        assert row.speedup_over_jacobi == pytest.approx(row.tokens_per_second / plain.tokens_per_second)
    assert rows[-1].fed_per_iteration > plain.fed_per_iteration  # n-grams and a second block ride along
    write_report([evaluation], "teacher", tmp_path)
    assert (tmp_path / REPORT_MD).read_text().count("| jacobi+") == 4
    assert variant("recycle+multi-block", everything) == DecodingOptions(
        recycle_candidates=2, blocks_in_flight=2, next_block_share=0.5
    )
    for bad in ("speculative", "recycle+", "lookup+paper"):
        with pytest.raises(ValueError, match="unknown drafting"):
            variant(bad, everything)

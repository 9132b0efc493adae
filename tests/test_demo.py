"""The demo's stage runner: markers are written only after success, finished stages are reused,
a changed or failed stage reruns everything after it, and --fresh starts over."""

from __future__ import annotations

import subprocess

import pytest

from cllm.toy import TOY_VERSIONS
from cllm.toy import sql as toy_sql
from cllm_pipelines.demo import BUDGETS, Stage, build_stages, parse_args, run_script, run_stages, teacher_settings


def _stages(calls: list[str], settings: dict[str, dict] | None = None, failing: str | None = None,
            outputs: dict[str, tuple] | None = None) -> list[Stage]:
    def action(name: str):
        def run() -> None:
            calls.append(name)
            if name == failing:
                raise RuntimeError(f"{name} failed")
        return run

    settings, outputs = settings or {}, outputs or {}
    return [Stage(name, f"the {name} stage", settings.get(name, {"n": 1}), action(name), outputs.get(name, ()))
            for name in ("a", "b", "c")]


def test_finished_stages_are_reused(tmp_path):
    calls: list[str] = []
    first = run_stages(_stages(calls), tmp_path)
    assert calls == ["a", "b", "c"]
    assert [reused for _, reused in first.values()] == [False, False, False]
    second = run_stages(_stages(calls), tmp_path)
    assert calls == ["a", "b", "c"]  # nothing ran again
    assert [reused for _, reused in second.values()] == [True, True, True]
    assert {name: seconds for name, (seconds, _) in second.items()} == {
        name: seconds for name, (seconds, _) in first.items()
    }


def test_a_changed_stage_reruns_with_everything_after_it(tmp_path):
    calls: list[str] = []
    run_stages(_stages(calls), tmp_path)
    calls.clear()
    run_stages(_stages(calls, settings={"b": {"n": 2}}), tmp_path)
    assert calls == ["b", "c"]


def test_a_failed_stage_is_not_taken_as_finished(tmp_path):
    calls: list[str] = []
    kept = tmp_path / "b-output"
    kept.mkdir()
    with pytest.raises(RuntimeError):
        run_stages(_stages(calls, failing="b", outputs={"b": (kept,)}), tmp_path)
    assert calls == ["a", "b"]
    calls.clear()
    run_stages(_stages(calls, outputs={"b": (kept,)}), tmp_path)
    assert calls == ["b", "c"]  # a is reused, the failed b and what follows run
    assert kept.exists()  # same settings: b resumes from what it left


def test_outputs_from_other_settings_are_deleted_before_a_rerun(tmp_path):
    calls: list[str] = []
    stale = tmp_path / "c-output"
    run_stages(_stages(calls, outputs={"c": (stale,)}), tmp_path)
    stale.mkdir()
    (stale / "model").write_text("trained on a's old data")
    calls.clear()
    run_stages(_stages(calls, settings={"a": {"n": 2}}, outputs={"c": (stale,)}), tmp_path)
    assert calls == ["a", "b", "c"]  # an upstream change reaches every later stage
    assert not stale.exists()


def test_budgets_and_stage_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGET", "long")
    config = parse_args(["--output", str(tmp_path / "demo")])
    assert config.budget_name == "long" and config.budget == BUDGETS["long"]
    assert parse_args(["--budget", "quick"]).budget == BUDGETS["quick"]
    stages = {stage.name: stage for stage in build_stages(config)}
    assert list(stages) == ["teacher", "collect", "train", "evaluate"]
    assert stages["teacher"].settings == {"model": "toy", "toy_version": TOY_VERSIONS["math"]}  # a new one reruns all
    evaluate = stages["evaluate"].settings["args"]
    assert evaluate[evaluate.index("--models") + 2] == f"cllm={tmp_path / 'demo' / 'cllm' / 'hf'}"
    collect = stages["collect"].settings["args"]
    assert collect[collect.index("--limit") + 1] == str(BUDGETS["long"].train_prompts)
    monkeypatch.setenv("BUDGET", "huge")
    with pytest.raises(SystemExit):
        parse_args([])


def test_the_domain_picks_teacher_prompts_output_and_budget(tmp_path, monkeypatch):
    from cllm_pipelines.demo import DOMAIN_BUDGETS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUDGET", raising=False)
    math = parse_args([])
    assert (math.domain, math.model, math.heldout_prompts) == ("math", "toy", "toy:heldout")
    assert math.output == (tmp_path / "runs" / "demo").resolve()
    sql = parse_args(["--domain", "sql"])
    assert (sql.model, sql.train_prompts, sql.heldout_prompts) == ("toy-sql", "toy-sql:train", "toy-sql:heldout")
    assert sql.output == (tmp_path / "runs" / "demo-sql").resolve() and sql.budget == DOMAIN_BUDGETS["sql"]["quick"]
    stages = {stage.name: stage for stage in build_stages(sql)}
    assert stages["teacher"].settings == {"model": "toy-sql", "toy_version": TOY_VERSIONS["sql"]}
    assert teacher_settings("/models/mine") == {"model": "/models/mine"}
    evaluate = stages["evaluate"].settings["args"]
    assert evaluate[evaluate.index("--prompts") + 1] == "toy-sql:heldout"
    train = stages["train"].settings["args"]
    assert train[train.index("--packed-states") + 1] == str(sql.budget.train_packed_states)
    assert train[train.index("--ar-target") + 1] == "labels"  # toy SQL's quick CLLM learns the gold queries
    math_stages = {stage.name: stage for stage in build_stages(math)}
    math_train = math_stages["train"].settings["args"]
    assert math_train[math_train.index("--ar-target") + 1] == "labels"  # every domain's quick recipe
    math_evaluate = math_stages["evaluate"].settings["args"]
    assert math_evaluate[math_evaluate.index("--limit") + 1] == "500"  # scored on 500, timed on 100
    assert math_evaluate[math_evaluate.index("--timed-prompts") + 1] == "100"
    long_evaluate = {stage.name: stage for stage in build_stages(parse_args(["--budget", "long"]))}["evaluate"]
    assert "--timed-prompts" not in long_evaluate.settings["args"]  # the long budget times every prompt
    assert parse_args(["--domain", "sql", "--budget", "tiny"]).budget == BUDGETS["tiny"]
    # every budget scores prompts the held-out split has (distinct questions, a bounded number)
    assert all(budget.eval_prompts <= toy_sql.TASK.max_heldout_prompts for budget in DOMAIN_BUDGETS["sql"].values())
    with pytest.raises(SystemExit):
        parse_args(["--domain", "poetry"])


def test_the_code_demo_trains_on_the_canonical_solutions(tmp_path, monkeypatch):
    from cllm_pipelines.demo import DOMAIN_BUDGETS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUDGET", raising=False)
    code = parse_args(["--domain", "code"])
    assert (code.model, code.train_prompts, code.heldout_prompts) == ("toy-code", "toy-code:train", "toy-code:heldout")
    assert code.budget == DOMAIN_BUDGETS["code"]["quick"] and code.budget.n_token == 16
    assert code.budget.eval_prompts >= 500  # the bar: pass@1 on at least 500 held-out tasks
    stages = {stage.name: stage for stage in build_stages(code)}
    assert stages["teacher"].settings == {"model": "toy-code", "toy_version": TOY_VERSIONS["code"]}
    train = stages["train"].settings["args"]
    assert train[train.index("--ar-target") + 1] == "labels"
    evaluate = stages["evaluate"].settings["args"]
    assert evaluate[evaluate.index("--prompts") + 1] == "toy-code:heldout"


def test_the_chat_demo_runs_on_the_chat_teacher_and_its_conversations(tmp_path, monkeypatch):
    from cllm_pipelines.demo import DOMAIN_BUDGETS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUDGET", raising=False)
    chat = parse_args(["--domain", "chat"])
    assert (chat.model, chat.train_prompts, chat.heldout_prompts) == ("toy-chat", "toy-chat:train", "toy-chat:heldout")
    assert chat.output == (tmp_path / "runs" / "demo-chat").resolve()
    assert chat.budget == DOMAIN_BUDGETS["chat"]["quick"] and chat.budget.n_token == 16
    assert chat.budget.eval_prompts >= 500  # the bar: accuracy on at least 500 held-out conversations
    stages = {stage.name: stage for stage in build_stages(chat)}
    assert stages["teacher"].settings == {"model": "toy-chat", "toy_version": TOY_VERSIONS["chat"]}
    evaluate = stages["evaluate"].settings["args"]
    assert evaluate[evaluate.index("--prompts") + 1] == "toy-chat:heldout"


def test_a_stage_prints_its_stderr_but_rays_noise_and_fails_with_its_exit_code(tmp_path, capsys):
    stage = tmp_path / "stage.py"
    stage.write_text(
        "import sys\n"
        "print('collect: 16/16 prompts')\n"
        "print('[2026-12-04 17:14:02,590 E 13850 13850] core_worker.cc:2465: Actor with class name: "
        "MapWorker has constructor arguments in the object store and max_restarts > 0.', file=sys.stderr)\n"
        "print('ValueError: a real error', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_script(str(stage))
    assert failure.value.returncode == 3
    err = capsys.readouterr().err
    assert "ValueError: a real error" in err and "core_worker" not in err


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path):
    """The real loop (collect and train on a local Ray, DeepSpeed on 2 CPU workers, evaluate) at
    the `tiny` budget, with a tiny random model in place of the toy teacher; then a rerun that
    reuses every stage."""
    import json
    import sys

    from cllm.hf import tiny_model
    from cllm.toy.teacher import ToyConfig, train_tokenizer
    from cllm_pipelines.demo import REPO

    tokenizer = train_tokenizer(ToyConfig(domain="math", vocab_size=300, tokenizer_corpus_docs=200))
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    command = [
        sys.executable, str(REPO / "pipelines" / "demo.py"), "--budget", "tiny", "--model", str(tmp_path / "teacher"),
        "--train-prompts", "toy-math:train", "--heldout-prompts", "toy-math:heldout",
        "--output", str(tmp_path / "demo"),
    ]
    first = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert {row["model"] for row in report["rows"]} == {"teacher", "cllm"}
    assert "| cllm | jacobi | 4 |" in first.stdout and "wall time per stage" in first.stdout
    assert "core_worker.cc" not in first.stderr  # Ray Data's actor-pool warning, filtered from the stages
    second = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing the finished stage") == 4

"""The cluster configs (cluster/aws.yaml, cluster/kuberay/, cluster/runtime_env.yaml, Dockerfile)
and the commands in docs/cluster.md, checked offline against the schemas and CLIs that Ray itself
ships: no cloud account, no Kubernetes cluster, no network."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCS = REPO / "docs" / "cluster.md"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}

# Secrets must never be in these files: nodes get S3 access from IAM roles (instance profile, IRSA).
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"AWS_SECRET_ACCESS_KEY"),
    re.compile(r"AWS_ACCESS_KEY_ID"),
    re.compile(r"AWS_SESSION_TOKEN"),
]

# Top-level `spec` fields of the KubeRay v1 CRDs (ray-operator/apis/ray/v1/*_types.go), to catch
# misspelt fields, which the API server would silently drop.
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy",
    "authOptions", "rayClusterStatusConditions",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy",
    "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds",
}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "idleTimeoutSeconds", "suspend", "resources", "labels",
}
HEAD_GROUP_FIELDS = {
    "serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels",
}


# -- helpers -------------------------------------------------------------------------------------


def load_yaml(path: Path):
    with open(path) as handle:
        return yaml.safe_load(handle)


@cache
def kuberay_documents() -> tuple[tuple[str, dict], ...]:
    """(file name, document) for every YAML document under cluster/kuberay/."""
    documents = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        with open(path) as handle:
            for document in yaml.safe_load_all(handle):
                if document:
                    documents.append((path.name, document))
    return tuple(documents)


def ray_resources(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in kuberay_documents() if doc.get("kind") == kind]


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=\"?([^\"\s]+)\"?\s*$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"Dockerfile declares no default for ARG {name}"
    return match.group(1)


def project_image() -> str:
    """The image every config runs: the one cluster/aws.yaml names."""
    return load_yaml(CLUSTER / "aws.yaml")["docker"]["image"]


def pod_containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def gpu_count(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def check_cluster_spec(spec: dict, where: str, service_accounts: set[str]) -> None:
    """A RayCluster spec (also RayService.rayClusterConfig, RayJob.rayClusterSpec): required fields,
    an autoscaling GPU worker group, the project's image and an IRSA service account."""
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    assert spec.get("rayVersion") == dockerfile_arg("RAY_VERSION"), (
        f"{where}: rayVersion differs from the Dockerfile's RAY_VERSION"
    )
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: the autoscaler is off"

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, f"{where}: unknown head fields {set(head) - HEAD_GROUP_FIELDS}"
    assert isinstance(head.get("rayStartParams", {}), dict)
    head_containers = pod_containers(head["template"])
    assert head_containers and all(c.get("name") and c.get("image") for c in head_containers)
    assert all(gpu_count(c) == 0 for c in head_containers), f"{where}: the head should be a CPU pod"
    pods = [head["template"]]

    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{where}: no worker group"
    gpu_groups = []
    for group in groups:
        unknown = set(group) - WORKER_GROUP_FIELDS
        assert not unknown, f"{where}: unknown worker group fields {unknown}"
        for field in ("groupName", "minReplicas", "maxReplicas", "template"):
            assert field in group, f"{where}: worker group without {field}"
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high, f"{where}: replicas outside [minReplicas, maxReplicas]"
        containers = pod_containers(group["template"])
        assert containers and all(c.get("name") and c.get("image") for c in containers)
        pods.append(group["template"])
        if any(gpu_count(c) > 0 for c in containers):
            gpu_groups.append(group)
            for container in containers:
                resources = container.get("resources", {})
                # Kubernetes requires requests == limits for extended resources such as GPUs.
                requested = resources.get("requests", {}).get("nvidia.com/gpu")
                assert requested is None or str(requested) == str(resources["limits"]["nvidia.com/gpu"])
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), f"{where}: the GPU group cannot scale"

    for pod in pods:
        assert pod["spec"].get("serviceAccountName") in service_accounts, (
            f"{where}: every Ray pod must run as an IRSA service account ({sorted(service_accounts)}) for S3"
        )
        for container in pod_containers(pod):
            assert container["image"] == project_image(), f"{where}: {container['image']} is not the project's image"


def irsa_service_accounts() -> set[str]:
    names = set()
    for _, doc in kuberay_documents():
        if doc.get("kind") == "ServiceAccount":
            annotations = doc.get("metadata", {}).get("annotations", {})
            if re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", annotations.get("eks.amazonaws.com/role-arn", "")):
                names.add(doc["metadata"]["name"])
    return names


def runtime_env_fields() -> set[str]:
    from ray.runtime_env import RuntimeEnv

    return set(RuntimeEnv.known_fields)


def check_runtime_env(runtime_env: dict, where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    assert isinstance(runtime_env, dict), f"{where}: not a mapping"
    unknown = set(runtime_env) - runtime_env_fields()
    assert not unknown, f"{where}: fields Ray does not know: {unknown}"
    env_vars = runtime_env.get("env_vars", {})
    strings = all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())
    assert strings, f"{where}: env_vars must be strings"
    RuntimeEnv(**runtime_env)  # Ray's own validation of each field


def file_text(path: Path) -> str:
    return path.read_text()


# -- cluster launcher ----------------------------------------------------------------------------


def test_aws_yaml_validates_against_the_schema_ray_ships():
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = load_yaml(CLUSTER / "aws.yaml")
    jsonschema.validate(config, schema)

    # And Ray's own config preparation (defaults merged, then validated again).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_aws_yaml_has_a_cpu_head_an_autoscaling_gpu_group_the_image_and_no_keys():
    config = load_yaml(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not re.match(r"(p|g)\d", head["node_config"]["InstanceType"]), "the head should be a CPU instance"

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if re.match(r"(p|g)\d", t["node_config"]["InstanceType"])}
    assert gpu_workers, "no GPU worker type (p*/g* instance)"
    for name, node_type in gpu_workers.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"], name

    assert config["docker"]["image"].rsplit("/", 1)[-1].startswith("cllm-ray:")
    assert config["setup_commands"], "no setup commands"
    assert any("ray start --head" in c and "--autoscaling-config" in c for c in config["head_start_ray_commands"])

    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IAM instance profile for S3"
    text = file_text(CLUSTER / "aws.yaml")
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"cluster/aws.yaml contains {pattern.pattern}"


BOOTSTRAP_SCRIPT = """
import json, sys
import boto3, yaml
from moto import mock_aws
from ray.autoscaler._private.aws.config import bootstrap_aws
from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
from ray.autoscaler._private.util import prepare_config

config = prepare_config(yaml.safe_load(open(sys.argv[1])))
region = config["provider"]["region"]
with mock_aws():
    iam = boto3.client("iam", region_name=region)
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()}
    for name in profiles:  # what docs/cluster.md tells the user to create once
        iam.create_role(RoleName=name, AssumeRolePolicyDocument="{}")
        iam.create_instance_profile(InstanceProfileName=name)
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    bootstrapped = bootstrap_aws(config)
    worker_type = next(n for n in bootstrapped["available_node_types"] if n != bootstrapped["head_node_type"])
    node_config = bootstrapped["available_node_types"][worker_type]["node_config"]
    provider = AWSNodeProvider(bootstrapped["provider"], bootstrapped["cluster_name"])
    created = provider.create_node(dict(node_config), {"ray-node-type": "worker", "ray-user-node-type": worker_type}, 1)
    instances = [i for r in boto3.client("ec2", region_name=region).describe_instances()["Reservations"]
                 for i in r["Instances"]]
    result = {"created": len(created), "node_config": node_config, "instances": instances}
    print("RESULT " + json.dumps(result, default=str))
"""


def test_aws_yaml_bootstraps_and_launches_a_gpu_worker_with_ray_s_aws_provider(tmp_path):
    """Ray's own AWS bootstrap (IAM, key pair, subnets, security group) and node launch against
    moto's mocked AWS: the config is accepted, and a GPU worker launches with its instance
    profile. In a subprocess: moto's in-process mock resets all moto state, which would wipe the
    session's S3 server (tests/conftest.py) if it ran in this process."""
    pytest.importorskip("boto3")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               RAY_USAGE_STATS_ENABLED="0")  # the launcher writes its ssh key under ~/.ssh
    result = subprocess.run([sys.executable, "-c", BOOTSTRAP_SCRIPT, str(CLUSTER / "aws.yaml")],
                            check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout[result.stdout.index("RESULT ") + len("RESULT "):])
    node_config = report["node_config"]
    assert node_config["SubnetIds"] and node_config["SecurityGroupIds"] and node_config["KeyName"]
    assert report["created"] == 1
    (instance,) = report["instances"]
    assert instance["InstanceType"] == node_config["InstanceType"]
    assert instance["IamInstanceProfile"]["Arn"].endswith("/" + node_config["IamInstanceProfile"]["Name"])


# -- KubeRay -------------------------------------------------------------------------------------


def test_kuberay_manifests_parse_and_use_ray_io_v1():
    documents = kuberay_documents()
    kinds = [doc.get("kind") for _, doc in documents]
    assert {"RayCluster", "RayJob", "RayService"} <= set(kinds)
    for name, doc in documents:
        assert doc.get("metadata", {}).get("name"), f"{name}: no metadata.name"
        if doc["kind"] in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", f"{name}: {doc['kind']} must use ray.io/v1"
            assert isinstance(doc.get("spec"), dict), f"{name}: no spec"
        else:
            assert doc["kind"] == "ServiceAccount" and doc["apiVersion"] == "v1", f"{name}: unexpected {doc['kind']}"
    text = "\n".join(file_text(p) for p in KUBERAY.glob("*.yaml"))
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"cluster/kuberay contains {pattern.pattern}"


def test_raycluster_has_an_autoscaling_gpu_worker_group():
    service_accounts = irsa_service_accounts()
    assert service_accounts, "no ServiceAccount with an eks.amazonaws.com/role-arn (IRSA) annotation"
    clusters = ray_resources("RayCluster")
    assert clusters
    for name, doc in clusters:
        check_cluster_spec(doc["spec"], name, service_accounts)
        autoscaler = doc["spec"].get("autoscalerOptions", {})
        assert autoscaler.get("upscalingMode", "Default") in {"Default", "Aggressive", "Conservative"}


def test_rayjobs_run_collect_and_train_on_the_cluster_with_s3_artifacts():
    service_accounts = irsa_service_accounts()
    cluster_names = {doc["metadata"]["name"] for _, doc in ray_resources("RayCluster")}
    jobs = ray_resources("RayJob")
    scripts = set()
    for name, doc in jobs:
        spec = doc["spec"]
        assert set(spec) <= RAYJOB_SPEC_FIELDS, f"{name}: unknown fields {set(spec) - RAYJOB_SPEC_FIELDS}"
        assert spec.get("entrypoint"), f"{name}: no entrypoint"
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster") in cluster_names, f"{name}: selects no RayCluster here"
        else:
            check_cluster_spec(spec["rayClusterSpec"], name, service_accounts)
        if "runtimeEnvYAML" in spec:
            check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), f"{name}: runtimeEnvYAML")
        script = re.search(r"pipelines/(\w+)\.py", spec["entrypoint"])
        assert script, f"{name}: the entrypoint runs no pipelines/*.py"
        scripts.add(script.group(1))
        assert "s3://" in spec["entrypoint"], f"{name}: artifacts must go through S3"
    assert {"collect", "train"} <= scripts


def test_rayservice_runs_the_serve_app_on_an_autoscaling_gpu_cluster():
    services = ray_resources("RayService")
    assert len(services) == 1
    name, doc = services[0]
    spec = doc["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_FIELDS, f"{name}: unknown fields {set(spec) - RAYSERVICE_SPEC_FIELDS}"
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    check_cluster_spec(spec["rayClusterConfig"], name, irsa_service_accounts())
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    for application in serve_config["applications"]:
        for deployment in application.get("deployments", []):
            if "autoscaling_config" in deployment:
                scaling = deployment["autoscaling_config"]
                assert scaling.get("min_replicas", 1) <= scaling.get("max_replicas", 1)


def test_rayservice_serve_config_matches_serve_config_yaml():
    """No drift: KubeRay deploys the same applications as `serve deploy serve/config.yaml`. Only
    http_options.host may differ: on Kubernetes the proxies must listen on 0.0.0.0 (the Serve
    config default) for the serve Service to reach them."""
    serve_config_path = REPO / "serve" / "config.yaml"
    assert serve_config_path.exists(), "serve/config.yaml is missing"
    expected = load_yaml(serve_config_path)
    (_, service), = ray_resources("RayService")
    actual = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert actual["applications"] == expected["applications"]
    assert actual.get("proxy_location") == expected.get("proxy_location")
    actual_http, expected_http = dict(actual.get("http_options", {})), dict(expected.get("http_options", {}))
    assert actual_http.pop("host", "0.0.0.0") == "0.0.0.0", "the RayService's proxies must listen on 0.0.0.0"
    expected_http.pop("host", None)
    assert actual_http == expected_http
    assert set(actual) == set(expected), "serveConfigV2 and serve/config.yaml have different top-level keys"


def test_rayservice_serve_config_is_a_valid_serve_deploy_config():
    """serveConfigV2 goes to Serve's REST API; Ray Serve's own schema must accept it."""
    from ray.serve.schema import ServeDeploySchema

    (_, service), = ray_resources("RayService")
    config = ServeDeploySchema.parse_obj(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.applications and config.http_options.port == 8000  # the port KubeRay's serve Service targets


def test_every_ray_version_and_image_agree():
    version = dockerfile_arg("RAY_VERSION")
    images = set()
    for name, doc in kuberay_documents():
        spec = doc.get("spec", {})
        for cluster_spec in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")):
            if doc.get("kind") in RAY_KINDS and cluster_spec and "headGroupSpec" in cluster_spec:
                assert cluster_spec["rayVersion"] == version, name
                images.add(cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"])
    assert images == {project_image()}
    assert project_image().endswith(":" + load_yaml(CLUSTER / "aws.yaml")["docker"]["image"].rsplit(":", 1)[-1])


# -- runtime env, Dockerfile ----------------------------------------------------------------------


def test_runtime_env_yaml_uses_only_fields_ray_knows():
    runtime_env = load_yaml(CLUSTER / "runtime_env.yaml")
    check_runtime_env(runtime_env, "cluster/runtime_env.yaml")
    if "working_dir" in runtime_env:  # relative to the repo root, where `ray job submit` runs
        assert (REPO / runtime_env["working_dir"]).is_dir()
    text = file_text(CLUSTER / "runtime_env.yaml")
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text)


def test_runtime_env_yaml_is_what_ray_job_submit_loads():
    """`ray job submit --runtime-env` parses the file with Ray's own loader."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    runtime_env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"))
    assert runtime_env == load_yaml(CLUSTER / "runtime_env.yaml")


def test_dockerfile_is_a_cuda_image_that_installs_torch_before_the_project():
    text = file_text(REPO / "Dockerfile")
    assert dockerfile_arg("CUDA_IMAGE").startswith("nvidia/cuda:")
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.MULTILINE)
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    torch_step = next(i for i, line in enumerate(runs) if "TORCH_SPEC" in line)
    project_step = next(i for i, line in enumerate(runs) if "pip install /app" in line)
    assert torch_step < project_step
    assert "RAY_VERSION" in runs[project_step]
    ignored = file_text(REPO / ".dockerignore").split()
    assert ".venv" in ignored and ".git" in ignored


# -- docs/cluster.md: every command names files and flags that exist ------------------------------


def doc_commands() -> list[list[str]]:
    """Shell commands in docs/cluster.md's fenced code blocks, continuation lines joined, as argv."""
    text = file_text(DOCS)
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = line.split(" #", 1)[0]
            try:
                commands.append(shlex.split(line))
            except ValueError:
                continue
    return commands


def kuberay_entrypoints() -> list[list[str]]:
    return [shlex.split(doc["spec"]["entrypoint"]) for _, doc in ray_resources("RayJob")]


def script_flags(scripts: set[str]) -> dict[str, frozenset[str]]:
    """The long options that `python pipelines/<script>.py --help` lists (argparse), per script;
    the scripts' --help run side by side."""
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(REPO / "pipelines" / f"{script}.py"), "--help"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        for script in sorted(scripts)
    }
    flags = {}
    for script, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"pipelines/{script}.py --help failed:\n{stderr[-2000:]}"
        flags[script] = frozenset(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", stdout))
    return flags


def pipeline_invocations(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each `pipelines/X.py` run in a command."""
    found = []
    for index, token in enumerate(argv):
        match = re.fullmatch(r"(?:.*/)?pipelines/(\w+)\.py", token)
        if match:
            rest = []
            for arg in argv[index + 1:]:
                if arg in {"&&", "||", ";", "|"}:
                    break
                rest.append(arg)
            found.append((match.group(1), rest))
    return found


def long_flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


def test_docs_cover_the_whole_chain_with_s3_paths():
    commands = [" ".join(c) for c in doc_commands()]
    text = "\n".join(commands)
    for needed in (r"ray up( -y)? cluster/aws\.yaml", r"kubectl apply -f cluster/kuberay/", r"ray job submit",
                   r"pipelines/collect\.py", r"pipelines/train\.py", r"pipelines/evaluate\.py",
                   r"serve deploy serve/config\.yaml", r"kubectl apply -f cluster/kuberay/rayservice\.yaml"):
        assert re.search(needed, text), f"docs/cluster.md runs no `{needed}`"
    for script in ("collect", "train"):
        for argv in doc_commands():
            for name, args in pipeline_invocations(argv):
                if name == script:
                    assert any(a.startswith("s3://") for a in args), f"`{' '.join(argv)}` uses no s3:// path"


def test_docs_and_rayjobs_only_name_flags_the_pipelines_have():
    invocations = [inv for argv in doc_commands() + kuberay_entrypoints() for inv in pipeline_invocations(argv)]
    assert {"collect", "train", "evaluate"} <= {script for script, _ in invocations}
    for script, _ in invocations:
        assert (REPO / "pipelines" / f"{script}.py").exists(), f"pipelines/{script}.py does not exist"
    flags = script_flags({script for script, _ in invocations})
    for script, args in invocations:
        unknown = set(long_flags(args)) - flags[script]
        assert not unknown, f"pipelines/{script}.py has no {sorted(unknown)}"


def _click_command(argv: list[str]):
    """The click command for `ray ...` / `serve ...` argv, and the remaining arguments."""
    if argv[0] == "ray":
        from ray.scripts.scripts import cli
    elif argv[0] == "serve":
        from ray.serve.scripts import cli
    else:
        return None, []
    import click

    command, rest = cli, argv[1:]
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def test_docs_ray_and_serve_commands_use_real_subcommands_and_options():
    import click

    checked = 0
    for argv in doc_commands():
        if argv[0] not in {"ray", "serve"}:
            continue
        command, rest = _click_command(argv)
        assert not isinstance(command, click.Group), f"`{' '.join(argv)}`: no such subcommand"
        options = {
            opt for param in command.params for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", [])
        }
        own_args = rest[: rest.index("--")] if "--" in rest else rest
        unknown = {flag for flag in long_flags(own_args) if flag not in options}
        assert not unknown, f"`{' '.join(argv)}`: {command.name} has no {sorted(unknown)}"
        checked += 1
    assert checked >= 4


def test_docs_name_only_files_that_exist():
    for argv in doc_commands():
        for token in argv:
            for match in re.finditer(r"(?<![\w/.:-])((?:cluster|serve|pipelines)/[\w./-]*\.(?:ya?ml|py|json))", token):
                assert (REPO / match.group(1)).exists(), f"docs/cluster.md names {match.group(1)}, which does not exist"


def test_docs_fill_in_every_placeholder_the_configs_ship_with():
    """The configs ship with placeholders (registry, bucket, IRSA role); docs/cluster.md must
    replace each one that a config uses."""
    placeholders = ("your-registry.example.com", "your-cllm-bucket", "arn:aws:iam::123456789012:role/cllm-ray-s3")
    config_text = "\n".join(file_text(p) for p in [CLUSTER / "aws.yaml", *KUBERAY.glob("*.yaml")])
    sed_commands = [" ".join(argv) for argv in doc_commands() if argv and argv[0] == "sed"]
    used = [p for p in placeholders if p in config_text]
    assert used, "no placeholders found: update this test"
    for placeholder in used:
        assert any(placeholder in command for command in sed_commands), f"docs/cluster.md never replaces {placeholder}"

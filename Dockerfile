# The image of the project: CUDA + Python + this package (which brings Ray, DeepSpeed, s3fs, ...).
# One image runs the head and the GPU workers, under the Ray cluster launcher (cluster/aws.yaml)
# and under KubeRay (cluster/kuberay/).
#
#   docker build -t your-registry.example.com/cllm-ray:0.1.0 .
#   docker push your-registry.example.com/cllm-ray:0.1.0
#
# Build arguments, for another CUDA or torch:
#   CUDA_IMAGE       the base image. "devel" rather than "runtime": DeepSpeed builds its CUDA ops
#                    (e.g. FusedAdam) just in time, with nvcc.
#   TORCH_SPEC, TORCH_INDEX_URL
#                    torch is installed first, from the index whose CUDA matches the base image, so
#                    the project's `torch>=2.4` is already met and pip pulls no other build.
#                    torch 2.11 + CUDA 13.0 is what the GPU machines we measure on run (driver 580).
#   RAY_VERSION      keep equal to `rayVersion` in cluster/kuberay/*.yaml (a test checks it).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC="torch==2.11.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG RAY_VERSION=2.60.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-venv: Ubuntu 24.04's own Python is "externally managed" (PEP 668), so we use a venv.
# openssh-client, rsync: the cluster launcher runs the autoscaler inside this container on the
#   head node, and it reaches new worker nodes over ssh and rsync.
# wget: KubeRay's default readiness and liveness probes call it.
# build-essential, python3-dev: DeepSpeed's just-in-time op builds.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential \
        openssh-client rsync wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip

# torch before the project (its own layer, so a code change doesn't reinstall it).
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"

# The project, at /app (the RayJobs run /app/pipelines/*.py). ray[default] adds the cluster
# launcher's and dashboard's needs; boto3 is what the AWS autoscaler on the head node uses.
WORKDIR /app
COPY . /app
RUN pip install /app "ray[default,data,train,serve]==${RAY_VERSION}" boto3 \
    && python -c "import cllm, pipelines, serve, ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"

CMD ["bash"]

"""The CLLM Ray Serve application: an OpenAI-compatible FastAPI ingress over an autoscaled Jacobi
decoder that batches continuously (one engine loop per replica).

    serve run serve.app:build_app model=<dir|hub id|toy> num_gpus=0      # builder arguments
    serve run serve/config.yaml                                           # the same, from YAML

The package installs as `cllm_serve` (`cllm_serve.app:build_app` works from anywhere); the
deployments live in `cllm_serve.ingress` and `cllm_serve.decoder`, so replicas import them from
the installed package whichever name the application was built under.
"""

# No `from __future__ import annotations` here: Serve reads the builder's parameter annotation
# at run time to turn `key=value` arguments into `BuilderArgs`.

import logging
import os

import ray
import torch
from pydantic import Field
from ray import serve

from cllm_raytools import Request, require_resources
from cllm_serve.decoder import Decoder, DecoderSettings
from cllm_serve.ingress import IngressSettings, OpenAIIngress
from cllm_serve.openai_api import RequestDefaults

# -- the application builder ----------------------------------------------------------------------


class BuilderArgs(DecoderSettings, RequestDefaults):
    """`serve run serve.app:build_app key=value ...` arguments, or `args:` in serve/config.yaml:
    the decoder's settings (`DecoderSettings`) and the requests' defaults (`RequestDefaults`),
    their one homes, plus the deployments' options.

    Deployment options given under `deployments:` in a Serve config override the ones set here."""

    served_model_name: str | None = Field(
        default=None, description="the `model` clients send; default: model"
    )
    graceful_shutdown_timeout_s: float = Field(
        default=120, ge=0, description="how long a stopping replica (decoder or ingress) drains its streams"
    )
    num_gpus: float | None = Field(
        default=None, ge=0, description="per decoder replica; default: 1 if CUDA is visible"
    )
    num_cpus: float = Field(default=1.0, gt=0, description="per decoder replica")
    ingress_num_cpus: float = Field(default=0.1, gt=0)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)
    autoscaling_overrides: dict[str, float] = Field(
        default_factory=dict, description="more autoscaling_config fields, e.g. upscale_delay_s"
    )
    max_ongoing_requests: int = Field(default=16, ge=1, description="per decoder replica; >= max_batch_size")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="per caller; beyond it: 503 (-1: no limit)"
    )
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    body_timeout_s: float = Field(default=30, gt=0, description="a request body must arrive within it (else 408)")
    health_timeout_s: float = Field(default=10, gt=0, description="/health fails unless a decoder answers within it")
    resume_attempts: int = Field(default=3, ge=0, description="resumed calls per request after replica deaths (0: off)")
    resume_timeout_s: float = Field(
        default=30, gt=0, description="how long a request whose replica died may wait for another to take it"
    )
    progress_interval_s: float = Field(
        default=0.25, ge=0, description="non-streamed requests: how often a decoder reports progress for resumption"
    )
    wait_for_resources_s: float = Field(
        default=0, ge=0, description="how long an autoscaling cluster may take to fit min_replicas (0: fail at once)"
    )


def check_capacity(request: Request, wait_s: float) -> None:
    """`require_resources` against the cluster this process is connected to or, since `serve run`
    builds the application before it connects, the one RAY_ADDRESS names (a short connection of
    its own). Without either, `serve run` starts a local Ray sized to the machine: nothing to check."""
    wait_option = "wait_for_resources_s=SECONDS"
    if ray.is_initialized():
        require_resources(request, wait_s, wait_option)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        try:
            require_resources(request, wait_s, wait_option)
        finally:
            ray.shutdown()


def build_app(args: BuilderArgs) -> serve.Application:
    """The application for `args`, after checking that the cluster can hold `min_replicas`
    decoders: an impossible request fails here, at once, instead of leaving replicas pending."""
    decoder_settings = DecoderSettings(**args.model_dump(include=set(DecoderSettings.model_fields)))
    num_gpus = args.num_gpus if args.num_gpus is not None else float(torch.cuda.is_available())
    if args.min_replicas > 0:
        check_capacity(Request("min_replicas", args.min_replicas, cpus=args.num_cpus, gpus=num_gpus),
                       args.wait_for_resources_s)
    decoder = Decoder.options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": num_gpus},
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            **args.autoscaling_overrides,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
    ).bind(decoder_settings)
    ingress_settings = IngressSettings(
        served_model_name=args.served_model_name or args.model,
        defaults=RequestDefaults(**args.model_dump(include=set(RequestDefaults.model_fields))),
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
        health_timeout_s=args.health_timeout_s,
        resume_attempts=args.resume_attempts,
        resume_timeout_s=args.resume_timeout_s,
        progress_interval_s=args.progress_interval_s,
    )
    # Streams pass through the ingress too: a redeploy that replaces it must let them finish.
    return OpenAIIngress.options(
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
    ).bind(decoder, ingress_settings)

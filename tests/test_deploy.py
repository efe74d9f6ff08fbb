"""The deployment recipes: the bento's image and environment, the Kubernetes manifests
(against the Kubernetes schemas, offline), the Docker Compose file (against the Compose
specification, offline) and the BentoCloud deployment config."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from backends.api.composition.settings import Settings, declared_environment, env_name
from backends.sdxl_backend.jobs.redis_queue.keys import PREFIX as SHARED_QUEUE_PREFIX
from backends.sdxl_backend.models.loras import LORA_FILE
from tests.served import ROOT

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
COMPOSE = ROOT / "deploy" / "compose.yaml"


@pytest.fixture(scope="module")
def bento(tiny_model, tiny_lora, tiny_controlnet, tiny_embedding, tiny_ip_adapter, tiny_upscaler):
    """A bento built from this checkout serving tiny-sdxl, with a LoRA made for SDXL base in the
    store beside tiny-sdxl's: its manifest, its directory, and the stored adapters that fit
    tiny-sdxl when it was built (other tests may have added some), by kind (upscalers fit all)."""
    from models.store import import_from_path, stored_model, stored_models

    unfit = stored_model("sdxl-style-lora") or import_from_path(
        "sdxl-style-lora", Path(tiny_lora.path) / LORA_FILE
    )  # no --fits: SDXL base's architecture
    assert unfit.info.labels["fits"] != tiny_lora.info.labels["fits"]
    fitting = {
        kind: {
            adapter_id: adapter
            for adapter_id, adapter in stored_models(kind).items()
            if adapter.info.labels["fits"] == tiny_lora.info.labels["fits"]
        }
        for kind in ("lora", "controlnet", "ip-adapter")
    }
    fitting["embedding"] = {
        embedding_id: embedding
        for embedding_id, embedding in stored_models("embedding").items()
        if embedding.info.labels["fits"] == tiny_embedding.info.labels["fits"]
    }
    fitting["upscaler"] = stored_models("upscaler")
    env = {**os.environ, "SDXL_MODELS": "tiny-sdxl"}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    shown = subprocess.run(
        [sys.executable, "-m", "bentoml", "get", tag, "-o", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    name, version = tag.split(":")
    return json.loads(shown.stdout), Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version, fitting


def test_bento_packs_the_served_models_and_the_adapters_that_fit_them_and_declares_the_environment(
    bento, tiny_model, tiny_lora, tiny_controlnet, tiny_embedding, tiny_ip_adapter, tiny_upscaler
):
    manifest, _, fitting = bento
    service = manifest["services"][0]
    assert {tiny_lora.tag, tiny_controlnet.tag, tiny_embedding.tag, tiny_ip_adapter.tag, tiny_upscaler.tag} <= {
        adapter.tag for kind in fitting.values() for adapter in kind.values()
    }
    assert sorted(model["tag"] for model in service["models"]) == sorted(
        [str(tiny_model.tag)] + [str(adapter.tag) for kind in fitting.values() for adapter in kind.values()]
    )
    assert service["config"]["resources"] == {"gpu": 1}
    assert service["config"]["traffic"]["timeout"] >= 300
    assert {env["name"]: env["value"] for env in manifest["envs"]} == declared_environment()
    assert {"SDXL_MAX_QUEUE", "SDXL_TIMEOUT_SECONDS", "SDXL_VRAM_MODE", "SDXL_MAX_STEPS"} <= set(declared_environment())


def test_a_bento_serves_only_the_models_it_packed(bento, tiny_model, serve):
    """An extra model in the store is not served by a built bento; its packed LoRAs,
    ControlNets, embeddings, IP-Adapters and upscalers are."""
    from models.store import import_from_path, stored_model

    stored_model("tiny-extra") or import_from_path("tiny-extra", Path(tiny_model.path))
    _, directory, fitting = bento
    server = serve("bento", {"SDXL_MODELS": ""}, target=f"{directory.parent.name}:{directory.name}")
    served = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=300).json()["models"]]
    loras = httpx.get(f"{server.url}/v1/loras", timeout=300).json()["data"]
    controlnets = httpx.get(f"{server.url}/v1/controlnets", timeout=300).json()["data"]
    embeddings = httpx.get(f"{server.url}/v1/embeddings", timeout=300).json()["data"]
    ip_adapters = httpx.get(f"{server.url}/v1/ip-adapters", timeout=300).json()["data"]
    upscalers = httpx.get(f"{server.url}/v1/upscalers", timeout=300).json()["data"]
    playground = httpx.get(f"{server.url}/ui", timeout=300)
    server.stop()
    assert playground.status_code == 200 and "SDXL playground" in playground.text  # packed with the code
    assert served == ["tiny-sdxl"]
    assert sorted((lora["id"], tuple(lora["fits"])) for lora in loras) == [
        (lora_id, ("tiny-sdxl",)) for lora_id in sorted(fitting["lora"])
    ]
    assert sorted((c["id"], tuple(c["fits"])) for c in controlnets) == [
        (controlnet_id, ("tiny-sdxl",)) for controlnet_id in sorted(fitting["controlnet"])
    ]
    assert sorted((e["id"], tuple(e["fits"])) for e in embeddings) == [
        (embedding_id, ("tiny-sdxl",)) for embedding_id in sorted(fitting["embedding"])
    ]
    assert sorted((a["id"], tuple(a["fits"])) for a in ip_adapters) == [
        (adapter_id, ("tiny-sdxl",)) for adapter_id in sorted(fitting["ip-adapter"])
    ]
    assert sorted(upscaler["id"] for upscaler in upscalers) == sorted(fitting["upscaler"])


def test_bento_image_is_lean_and_pinned(bento):
    _, directory, _ = bento
    dockerfile = (directory / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "apt-get" not in dockerfile and "build-essential" not in dockerfile  # no toolchain in the image
    assert "USER bentoml" in dockerfile
    locked = (directory / "env" / "python" / "requirements.txt").read_text()
    pins = dict(line.split("==", 1) for line in locked.splitlines() if "==" in line and not line.startswith("#"))
    for requirement in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in requirement and not requirement.startswith("#"):
            package, version = requirement.split("==")
            assert pins[package.replace("_", "-").lower()] == version, package
    assert any(name.startswith("nvidia-") for name in pins)  # the CUDA build of torch
    shipped = sorted(str(p.relative_to(directory / "src")) for p in (directory / "src").rglob("*") if p.is_file())
    assert shipped == sorted(
        ["service.py", "bentofile.yaml", "requirements.txt", "models/catalog.toml"]
        + ["backends/api/native/playground.html", "backends/api/operations/fleet.html"]
        + [str(p.relative_to(ROOT)) for p in (ROOT / "backends").rglob("*.py")]
        + [str(p.relative_to(ROOT)) for p in (ROOT / "backends").rglob("*.lua")]
        + [str(p.relative_to(ROOT)) for p in (ROOT / "models").glob("*.py")]
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_kubernetes_manifests_validate_strictly(path):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, "1.30", strict=True)


def test_the_validation_catches_mistakes():
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


COMPOSE_ENV = {"SDXL_API_KEYS": "key-a,key-b", "REDIS_PASSWORD": "redis-secret"}  # what the file's header sets


class MissingVariable(ValueError):
    """A `${NAME:?message}` left unset: `docker compose` refuses to start, with the message."""


def compose_file(env: dict[str, str] = COMPOSE_ENV) -> dict:
    """deploy/compose.yaml as `docker compose config` reads it with `env` set: YAML anchors and
    merge keys resolved, then each value's variables (`${NAME:-default}`, `${NAME:?message}`:
    required; `$$` a dollar)."""

    def variable(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, kind, text = match[1], match[2], match[3] or ""
        if env.get(name):
            return env[name]
        if kind == ":?":
            raise MissingVariable(f"{name}: {text}")
        return text

    def interpolated(value):
        if isinstance(value, dict):
            return {key: interpolated(item) for key, item in value.items()}
        if isinstance(value, list):
            return [interpolated(item) for item in value]
        if isinstance(value, str):
            return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", variable, value)
        return value

    return interpolated(yaml.safe_load(COMPOSE.read_text()))


def test_compose_file_follows_the_compose_specification_and_pins_a_gpu_per_replica():
    data = compose_file()
    PyCompose.from_json(json.dumps(data))  # the Compose specification, offline: ValueError when broken
    services = data["services"]
    replicas = {name: service for name, service in services.items() if name.startswith("replica-")}
    gpus = [
        device_ids
        for service in replicas.values()
        for device in service["deploy"]["resources"]["reservations"]["devices"]
        for device_ids in [device["device_ids"]]
    ]
    assert len(replicas) >= 2 and sorted(gpus) == [[str(index)] for index in range(len(replicas))]
    for service in replicas.values():
        environment = service["environment"]
        assert service["image"] == "sdxl:latest"
        assert environment["SDXL_REDIS_URL"] == "redis://:redis-secret@redis:6379/0"  # (with its password)
        assert environment["SDXL_API_KEYS"] == "key-a,key-b" and environment["SDXL_ALLOWED_HOSTS"] != "*"
        assert set(service["environment"]) <= {env_name(field) for field in Settings.model_fields}
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert "--appendonly" in services["redis"]["command"] and services["redis"]["volumes"]
    assert services["redis"]["command"][-2:] == ["--requirepass", "redis-secret"]
    assert [name for name, service in services.items() if "ports" in service] == ["front"]  # one published port
    upstream = re.findall(r"server (\S+):3000;", data["configs"]["front"]["content"])
    assert sorted(upstream) == sorted(replicas)
    for service in services.values():
        assert set(service.get("depends_on", [])) <= set(services)


def test_the_compose_file_does_not_start_without_keys_or_a_redis_password():
    for unset in COMPOSE_ENV:
        with pytest.raises(MissingVariable, match=unset):
            compose_file({name: value for name, value in COMPOSE_ENV.items() if name != unset})


def test_the_compose_check_catches_mistakes():
    broken = compose_file()
    broken["services"]["redis"]["comand"] = ["redis-server"]
    with pytest.raises(ValueError, match="comand"):
        PyCompose.from_json(json.dumps(broken))


def test_kubernetes_deployment_is_what_the_service_needs():
    documents = {
        (doc["kind"], doc["metadata"]["name"]): doc
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
    }
    deployment = documents["Deployment", "sdxl"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room to load SDXL
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    env = {variable["name"]: variable for variable in container["env"]}
    keys = env["SDXL_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert keys["name"] == documents["Secret", "sdxl-api-keys"]["metadata"]["name"] and not keys.get("optional")
    assert "*" not in env["SDXL_ALLOWED_HOSTS"]["value"].split(",")  # names, not any Host
    service = documents["Service", "sdxl"]["spec"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # Replicas share the queue in Redis: no session affinity, and the Redis the URL names is there.
    assert deployment["spec"]["replicas"] >= 2 and "sessionAffinity" not in service
    redis_url = urlparse(env["SDXL_REDIS_URL"]["value"])
    redis_service = documents["Service", redis_url.hostname]["spec"]
    assert redis_service["ports"][0]["port"] == redis_url.port
    assert redis_service["selector"] == documents["StatefulSet", redis_url.hostname]["spec"]["selector"]["matchLabels"]
    # Redis has a password, from the Secret the StatefulSet reads too, and only the server's pods reach it.
    assert redis_url.password == "$(REDIS_PASSWORD)"
    password = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    redis_container = documents["StatefulSet", redis_url.hostname]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": password}} in redis_container["env"]
    assert redis_container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert documents["Secret", password["name"]]["stringData"][password["key"]]
    policy = documents["NetworkPolicy", redis_url.hostname]["spec"]
    assert (
        policy["podSelector"] == redis_service["selector"]
        or policy["podSelector"]["matchLabels"] == redis_service["selector"]
    )
    assert {"podSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}} in policy["ingress"][0][
        "from"
    ]
    # A stopping pod first answers the synchronous requests it holds.
    assert pod["terminationGracePeriodSeconds"] >= Settings().timeout_seconds
    pdb = documents["PodDisruptionBudget", "sdxl"]["spec"]
    assert pdb["selector"] == deployment["spec"]["selector"] and pdb["maxUnavailable"] == 1


def test_kubernetes_autoscaler_reads_the_shared_queue():
    scaled = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "keda" / "scaledobject.yaml").read_text())
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == f"{SHARED_QUEUE_PREFIX}queue"
    redis_url = urlparse(
        next(
            e["value"]
            for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] == "SDXL_REDIS_URL"
        )
    )
    assert trigger["metadata"]["address"].startswith(f"{redis_url.hostname}.")
    assert trigger["metadata"]["address"].endswith(f":{redis_url.port}")
    assert trigger["metadata"]["databaseIndex"] == redis_url.path.strip("/")


def test_bentocloud_config_is_what_bentoml_deploy_accepts():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    config = yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())
    schema = bentoml_cattr.structure({**config, "bento": "sdxl:latest"}, CreateDeploymentSchema)
    service = schema.services["sdxl"]
    assert service.instance_type.startswith("gpu.")
    assert 0 <= service.scaling.min_replicas < service.scaling.max_replicas
    assert service.config_overrides["traffic"]["concurrency"] >= 1
    assert {env.name for env in schema.envs} <= set(declared_environment())


def test_the_bentoml_class_service_py_replaces_is_where_it_expects():
    """service.py puts `TimelyTimeout` in the place of BentoML's private `TimeoutMiddleware`
    (bentoml._internal.server.http.traffic), which BentoML's app factory reads when it builds
    the app. A BentoML upgrade that moves or reshapes it must fail here, not silently bring the
    leaking timer back."""
    from bentoml._internal.server import base_app
    from bentoml._internal.server.http import traffic

    from backends.api.edge.middleware import TimelyTimeout

    original = traffic.TimeoutMiddleware

    class Probe(base_app.BaseAppFactory):
        name = "probe"

    try:
        traffic.TimeoutMiddleware = TimelyTimeout  # what service.py does
        (middleware,) = Probe(timeout=5).middlewares
        assert middleware.cls is TimelyTimeout and middleware.kwargs == {"timeout": 5}
    finally:
        traffic.TimeoutMiddleware = original
    assert issubclass(TimelyTimeout, original)
    assert callable(original._set_timer_out)  # what TimelyTimeout's timer calls
    instance = original(app=None, timeout=5)
    assert (instance.app, instance.timeout) == (None, 5)

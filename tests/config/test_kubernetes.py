"""deploy/kubernetes/: the manifests against Kubernetes' schemas (offline, with the
schemas kubernetes-validate ships), the inference extension's objects against the
fields of their v1 APIs, and the pieces against each other and against mmd itself."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mmd.config.settings import parse_config
from mmd.runtime.synthetic import write_model

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are meant for; every field they use exists there.
KUBERNETES = "1.30.0"

# The fields of the Gateway API Inference Extension's InferencePool
# (inference.networking.k8s.io/v1) and Gateway API's HTTPRoute
# (gateway.networking.k8s.io/v1) that these manifests use, with what those APIs
# require of them. kubernetes-validate has no schemas for CRDs.
PORT = {
    "type": "object",
    "required": ["number"],
    "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}},
    "additionalProperties": False,
}
INFERENCE_POOL = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "spec": {
            "type": "object",
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": PORT},
                "endpointPickerRef": {
                    "type": "object",
                    "required": ["name", "port"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "port": PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                },
            },
        },
    },
}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}  # Gateway API's
HTTP_ROUTE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "spec": {
            "type": "object",
            "required": ["parentRefs", "rules"],
            "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "minItems": 1},
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {"type": "array"},
                            "backendRefs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {
                                        "group": {"type": "string"},
                                        "kind": {"type": "string"},
                                        "name": {"type": "string"},
                                    },
                                },
                            },
                            "timeouts": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "request": DURATION,
                                    "backendRequest": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {"InferencePool": INFERENCE_POOL, "HTTPRoute": HTTP_ROUTE}


def manifests() -> list[dict[str, Any]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def check(doc: dict[str, Any]) -> None:
    """Raises when ``doc`` does not match its schema."""
    schema = CRD_SCHEMAS.get(doc["kind"])
    if schema is not None:
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_every_manifest_matches_its_schema() -> None:
    kinds = sorted(doc["kind"] for doc in manifests())
    assert kinds == [
        "ConfigMap",
        "HTTPRoute",
        "InferencePool",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ]
    for doc in manifests():
        check(doc)


@pytest.mark.parametrize(
    ("kind", "path", "bad"),
    [
        ("StatefulSet", ("spec", "replicas"), "three"),
        ("StatefulSet", ("spec", "template", "spec", "containerz"), []),
        ("Service", ("spec", "ports"), [{"port": "http"}]),
        ("InferencePool", ("spec", "targetPorts"), [{"number": 0}]),
        ("InferencePool", ("spec", "endpointPickerRef", "failureMode"), "Retry"),
        ("HTTPRoute", ("spec", "rules", 0, "timeouts", "request"), "ten minutes"),
    ],
)
def test_the_schemas_catch_a_mistake(kind: str, path: tuple[Any, ...], bad: Any) -> None:
    doc = copy.deepcopy(by_kind(kind)[0])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        check(doc)


def test_the_pieces_fit_together(tmp_path: Path) -> None:
    (statefulset,) = by_kind("StatefulSet")
    (pool,) = by_kind("InferencePool")
    (route,) = by_kind("HTTPRoute")
    (config_map,) = by_kind("ConfigMap")
    (secret,) = by_kind("Secret")
    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # The pool selects the StatefulSet's pods on the port mmd serves HTTP on, and the
    # route sends requests to the pool.
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    backends = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert {"group": "inference.networking.k8s.io", "kind": "InferencePool"}.items() <= backends[
        0
    ].items()
    assert backends[0]["name"] == pool["metadata"]["name"]
    for service in by_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()

    # GPUs requested; every probe runs the /health probe from the ConfigMap.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["python3", "/etc/mmd/probe.py"]
    compile(config_map["data"]["probe.py"], "probe.py", "exec")
    assert "/health" in config_map["data"]["probe.py"]

    # mmd accepts the ConfigMap's config (with the models volume and the Secret's
    # keys file put here), listening where the pod's ports say.
    models = tmp_path / "models"
    text = config_map["data"]["mmd.toml"].replace("/models/", f"{models}/")
    for name in ("chat", "coder"):
        write_model(models / f"{name}.gguf")
    keys = tmp_path / "api-keys"
    keys.write_text(secret["stringData"]["api-keys"])
    keys.chmod(0o440)
    text = text.replace("/etc/mmd/keys/api-keys", str(keys))
    config = parse_config(text, tmp_path / "mmd.toml")
    assert [a.port for a in config.http.listen] == [ports["http"]]
    assert config.metrics.listen == f"0.0.0.0:{ports['metrics']}"
    assert config.http.api_keys_file == keys
    assert sorted(config.models) == ["chat", "coder"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/models"] == "models"
    assert mounts["/etc/mmd/keys"] == "api-keys"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["defaultMode"] & 0o004 == 0  # mmd refuses o+r

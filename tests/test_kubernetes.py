"""The Kubernetes and KServe manifests, checked offline: the Kubernetes schemas (kubernetes-validate, strict),
and the pieces agreeing with each other and with the server they run.

No cluster runs in CI. What a cluster would catch first is checked here: every resource against the
schema of its kind; selectors, ports and probes that point at what exists; the drain fitting in the
grace period; the server's own settings parser reading each container's flags and RNNSERVE_*
variables; HAProxy (Debian's) accepting the proxy's configuration.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from rnnserve.server.settings import ENV_PREFIX, parse_settings
from rnnserve.server.app import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
K8S, KSERVE = ROOT / "deploy" / "k8s", ROOT / "deploy" / "kserve"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes these manifests are for: gRPC probes are GA since 1.27


def resources(folder: Path) -> list[dict]:
    return [resource for path in sorted(folder.glob("*.yaml")) for resource in yaml.safe_load_all(path.read_text())
            if resource]


def by_kind(kind: str) -> dict[str, dict]:
    return {resource["metadata"]["name"]: resource for resource in resources(K8S) if resource["kind"] == kind}


def container_settings(container: dict):
    """The server's settings as the container's command line and RNNSERVE_* variables give them."""
    args = container["args"]
    assert args[0] == "rnnserve-server"
    environ = {variable["name"]: variable["value"] for variable in container.get("env", []) if "value" in variable}
    environ |= {variable["name"]: "pod-name" for variable in container.get("env", []) if "valueFrom" in variable}
    assert all(name.startswith(ENV_PREFIX) for name in environ)
    return parse_settings(args[1:], environ)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


@pytest.mark.parametrize("resource", resources(K8S), ids=lambda r: f"{r['kind']}/{r['metadata']['name']}")
def test_every_kubernetes_resource_validates_strictly(resource):
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_replicas_serve_every_face_on_the_ports_they_declare_and_probe_their_grpc_health():
    deployment = by_kind("Deployment")["rnnserve"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    settings = container_settings(container)
    assert settings.redis_url == "redis://rnnserve-redis:6379/0"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": port_of(settings.listen), "http": port_of(settings.http_listen),
                     "v2-grpc": port_of(settings.v2_listen), "v2-http": port_of(settings.v2_http_listen),
                     "metrics": port_of(settings.metrics_listen)}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # NOT_SERVING while draining
    assert "service" not in container["livenessProbe"]["grpc"]


def test_the_drain_fits_in_the_termination_grace_period():
    spec = by_kind("Deployment")["rnnserve"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    hand_off_allowance = 10  # handing sessions to Redis: about a second per 10,000
    assert int(pre_stop[1]) + container_settings(container).grace_seconds + hand_off_allowance <= \
        spec["terminationGracePeriodSeconds"]


def test_selectors_and_ports_point_at_what_exists():
    deployments = by_kind("Deployment")
    for service in by_kind("Service").values():
        [target] = [d for d in deployments.values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        named_ports = {port["name"] for container in target["spec"]["template"]["spec"]["containers"]
                       for port in container["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= named_ports, service["metadata"]["name"]
    for deployment in deployments.values():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()
    pod_labels = deployments["rnnserve"]["spec"]["template"]["metadata"]["labels"]
    [budget] = by_kind("PodDisruptionBudget").values()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_autoscaler_scales_the_replicas_on_cpu_they_request():
    [autoscaler] = by_kind("HorizontalPodAutoscaler").values()
    target = autoscaler["spec"]["scaleTargetRef"]
    deployment = by_kind(target["kind"])[target["name"]]
    assert [metric["resource"]["name"] for metric in autoscaler["spec"]["metrics"]] == ["cpu"]
    assert all("cpu" in container["resources"]["requests"]
               for container in deployment["spec"]["template"]["spec"]["containers"])
    [budget] = by_kind("PodDisruptionBudget").values()
    assert budget["spec"]["maxUnavailable"] < autoscaler["spec"]["minReplicas"]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")
def test_haproxy_accepts_its_configuration_and_reaches_every_replica_port(tmp_path):
    [config_map] = [r for r in resources(K8S) if r["kind"] == "ConfigMap"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(config_map["data"]["haproxy.cfg"])
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    [container] = by_kind("Deployment")["rnnserve"]["spec"]["template"]["spec"]["containers"]
    settings = container_settings(container)
    for port in (settings.listen, settings.v2_listen, settings.v2_http_listen):
        assert f"rnnserve-replicas.default.svc.cluster.local:{port_of(port)}" in config.read_text()


def test_the_kserve_runtime_runs_the_server_it_describes_and_the_inference_service_uses_it():
    [runtime] = [r for r in resources(KSERVE) if r["kind"] == "ServingRuntime"]
    [service] = [r for r in resources(KSERVE) if r["kind"] == "InferenceService"]
    # The runtime's containers are a pod's: validated as the pod KServe makes of them.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rnnserve"},
           "spec": {"containers": runtime["spec"]["containers"]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    [container] = runtime["spec"]["containers"]
    settings = container_settings(container)
    assert str(settings.model_repository) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert [port["containerPort"] for port in container["ports"]] == [port_of(settings.v2_http_listen)]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]

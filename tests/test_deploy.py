"""deploy/: the KubeRay manifest is valid YAML with what KubeRay's v1 CRDs require, and its command runs.

The required fields and the known field names are those of KubeRay's ``ray.io_rayjobs.yaml`` CRD (``ray.io/v1``;
its OpenAPI schema's ``required`` lists and ``properties``, also what the older ``v1alpha1`` required:
``entrypoint`` and ``rayStartParams``). No Kubernetes API server runs here, so the schema's rules are restated
rather than served; the entrypoint is parsed by the real CLI parser, so a renamed option fails here.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import pytest

from conftest import ROOT

yaml = pytest.importorskip("yaml")
MANIFEST = os.path.join(ROOT, "deploy", "rayjob.yaml")

# ray.io/v1 RayJob (KubeRay's CRD): the properties of spec, rayClusterSpec, the head and a worker group
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
CLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
    "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
              "serviceType", "template"}  # fmt: skip
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
HEAD_REQUIRED = {"template", "rayStartParams"}  # v1: template; v1alpha1 (older operators): rayStartParams too
WORKER_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template", "rayStartParams"}


def documents() -> dict[str, dict[str, Any]]:
    with open(MANIFEST) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    for d in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(d) and d["metadata"].get("name")
    return by_kind


def check_pod_template(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]  # PodSpec requires containers; a container, its name
    assert containers, where
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container without a name or image"
    return containers


def test_rayjob_has_what_the_kuberay_crd_requires() -> None:
    job = documents()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC  # a misspelt field is silently pruned by k8s
    assert spec["entrypoint"].strip()
    rcs = spec["rayClusterSpec"]
    assert set(rcs) <= CLUSTER_SPEC and "headGroupSpec" in rcs, set(rcs) - CLUSTER_SPEC
    head = rcs["headGroupSpec"]
    assert HEAD_REQUIRED <= set(head) <= HEAD_GROUP, set(head) ^ HEAD_GROUP
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map of strings in the CRD
    check_pod_template(head["template"], "head")
    assert rcs["workerGroupSpecs"]
    for g in rcs["workerGroupSpecs"]:
        assert WORKER_REQUIRED <= set(g) <= WORKER_GROUP, set(g) ^ WORKER_GROUP
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        check_pod_template(g["template"], g["groupName"])
    # every pod runs the same image (the same Ray and tweet-embed as the driver), and rayVersion says which
    images = {c["image"] for c in check_pod_template(head["template"], "head")}
    images |= {c["image"] for g in rcs["workerGroupSpecs"] for c in check_pod_template(g["template"], "w")}
    assert len(images) == 1
    assert rcs["rayVersion"] in open(os.path.join(ROOT, "deploy", "Dockerfile")).read()


def test_entrypoint_is_a_tweet_embed_command_on_ray_against_the_tei_service() -> None:
    from tweet_embed.cli import build_parser

    docs = documents()
    argv = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    assert argv[:2] == ["tweet-embed", "embed"]
    args = build_parser().parse_args(argv[1:])  # SystemExit on an unknown or misspelt option
    assert args.engine == "ray" and args.ray_address is None  # job submission sets RAY_ADDRESS for the driver
    assert args.work_dir.startswith("s3://")  # every node must see the work dir: an object store
    # the URL names the Service, on the port it serves, which is the port TEI listens on in the Deployment
    svc, dep = docs["Service"], docs["Deployment"]
    port = svc["spec"]["ports"][0]
    assert args.tei_urls == [f"http://{svc['metadata']['name']}:{port['port']}/embed"]
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    tei = check_pod_template(dep["spec"]["template"], "tei")[0]
    assert port["targetPort"] in [p["containerPort"] for p in tei["ports"]]
    assert str(port["targetPort"]) == tei["args"][tei["args"].index("--port") + 1]

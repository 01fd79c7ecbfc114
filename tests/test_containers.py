"""Images, the compose pod demo and the Kruise manifests (issue 3).

The compose demo needs a Docker engine: without one it is skipped with the
reason shown (pytest -rs), unless HOTSWAP_REQUIRE_DOCKER=1 (set by .ci/run
after it brought Docker up), where a missing engine fails the test.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs (types-jsonschema not a dep)
import pytest
import yaml
from conftest import ROOT

KRUISE = ROOT.parent / "shared" / "kruise"
DOCKERFILES = ["Dockerfile.sidecar", "Dockerfile.empty", "Dockerfile.busybox"]


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, *DOCKERFILES], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (a top-level file) out of the
    build context: its patterns in order, the last match deciding."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(path, pattern.removeprefix("!")):
            ignored = not negated
    return ignored


def test_the_sidecar_build_has_every_file_its_packaging_names() -> None:
    """The build stage of Dockerfile.sidecar copies each file setup.cfg
    names (the long description, the license files). Without LICENSE the
    image's wheel carried no license, and setuptools warned that a missing
    license file stops the build from 2027-02-18 (its build dependency is
    not pinned: each build takes the newest)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    needed = cfg["metadata"]["license_files"].split()
    needed += [name.strip() for name in
               cfg["metadata"]["long_description"].removeprefix("file:").split(",")]
    text = (ROOT / "Dockerfile.sidecar").read_text()
    build = text.split(" AS build\n", 1)[1].split("\nFROM ", 1)[0]
    copied = {src for line in build.splitlines() if line.startswith("COPY ")
              and "--from" not in line for src in line.split()[1:-1]}
    for name in needed:
        assert (ROOT / name).is_file(), name
        assert name in copied, f"Dockerfile.sidecar's build stage does not copy {name}"
        assert not dockerignored(name), f".dockerignore leaves {name} out of the context"


def crd_schema(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    path = KRUISE / name
    if not path.exists():
        pytest.fail(f"OpenKruise CRD {path} is missing (shared/kruise is part of the repo setup)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return crd, version["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would reject with strict field validation (a
    structural schema prunes them silently otherwise): keys not declared in
    ``properties`` where the schema does not preserve unknown fields."""
    found: list[str] = []
    # preserve-unknown-fields keeps unknown keys at this level only; declared
    # properties below it are still structural (the CRD trims the embedded
    # core Container to Kruise's own fields this way).
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None and not preserve:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.parametrize(("manifest", "crd_file"), [
    ("config/sidecarset.yaml", "apps.kruise.io_sidecarsets.yaml"),
    ("config/cloneset.yaml", "apps.kruise.io_clonesets.yaml"),
])
def test_manifest_matches_the_kruise_crd(manifest: str, crd_file: str) -> None:
    crd, schema = crd_schema(crd_file)
    doc = yaml.safe_load((ROOT / manifest).read_text())
    assert doc["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    assert doc["kind"] == crd["spec"]["names"]["kind"]
    jsonschema.validate(doc, schema)
    assert unknown_fields(doc["spec"], schema["properties"]["spec"]) == []


def test_schema_check_can_fail() -> None:
    """The two checks above reject a wrong type and a misspelt field."""
    _, schema = crd_schema("apps.kruise.io_sidecarsets.yaml")
    doc = yaml.safe_load((ROOT / "config/sidecarset.yaml").read_text())
    doc["spec"]["containers"][0]["upgradeStrategy"]["upgradeTyp"] = "HotUpgrade"
    assert unknown_fields(doc["spec"], schema["properties"]["spec"]) == [
        ".containers[0].upgradeStrategy.upgradeTyp"]
    doc["spec"]["updateStrategy"]["type"] = 7
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


# The Kubernetes core/v1 fields the CRDs leave unchecked: both keep the
# pod template and the sidecar's Container as x-kubernetes-preserve-unknown-
# fields, and the controllers decode them into Go structs, which drop a
# misspelt field without a word (readOnlyRootFileSystem: a writable root).
# Each type's fields as of Kubernetes 1.33; a value None is not walked.
_CORE: dict[str, dict[str, str | None]] = {
    "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    "ObjectMeta": {"labels": None, "annotations": None, "name": None,
                   "namespace": None, "generateName": None},
    "PodSpec": {k: None for k in (
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig",
        "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC",
        "hostNetwork", "hostPID", "hostUsers", "hostname", "imagePullSecrets", "nodeName",
        "nodeSelector", "os", "overhead", "preemptionPolicy", "priority",
        "priorityClassName", "readinessGates", "resourceClaims", "resources",
        "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
        "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
        "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds",
        "tolerations", "topologySpreadConstraints", "volumes")}
    | {"containers": "Container", "initContainers": "Container",
       "securityContext": "PodSecurityContext"},
    "Container": {k: None for k in (
        "args", "command", "envFrom", "image", "imagePullPolicy", "name", "ports",
        "resizePolicy", "resources", "restartPolicy", "stdin", "stdinOnce",
        "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
        "volumeMounts", "workingDir")}
    | {"env": "EnvVar", "lifecycle": "Lifecycle", "livenessProbe": "Probe",
       "readinessProbe": "Probe", "startupProbe": "Probe",
       "securityContext": "SecurityContext"},
    "EnvVar": {"name": None, "value": None, "valueFrom": None},
    "Lifecycle": {"postStart": "LifecycleHandler", "preStop": "LifecycleHandler",
                  "stopSignal": None},
    "LifecycleHandler": {"exec": "ExecAction", "httpGet": None, "sleep": None,
                         "tcpSocket": None},
    "ExecAction": {"command": None},
    "Probe": {k: None for k in (
        "failureThreshold", "grpc", "httpGet", "initialDelaySeconds", "periodSeconds",
        "successThreshold", "tcpSocket", "terminationGracePeriodSeconds", "timeoutSeconds")}
    | {"exec": "ExecAction"},
    "SecurityContext": {k: None for k in (
        "allowPrivilegeEscalation", "appArmorProfile", "privileged", "procMount",
        "readOnlyRootFilesystem", "runAsGroup", "runAsNonRoot", "runAsUser",
        "seLinuxOptions", "windowsOptions")}
    | {"capabilities": "Capabilities", "seccompProfile": "SeccompProfile"},
    "PodSecurityContext": {k: None for k in (
        "appArmorProfile", "fsGroup", "fsGroupChangePolicy", "runAsGroup", "runAsNonRoot",
        "runAsUser", "seLinuxChangePolicy", "seLinuxOptions", "supplementalGroups",
        "supplementalGroupsPolicy", "sysctls", "windowsOptions")}
    | {"seccompProfile": "SeccompProfile"},
    "Capabilities": {"add": None, "drop": None},
    "SeccompProfile": {"type": None, "localhostProfile": None},
}


def core_unknown_fields(value: Any, kind: str, path: str = "") -> list[str]:
    """Keys of ``value`` (a ``kind`` of _CORE, or a list of them) that the
    type does not have."""
    if isinstance(value, list):
        return [f for i, item in enumerate(value)
                for f in core_unknown_fields(item, kind, f"{path}[{i}]")]
    found: list[str] = []
    fields = _CORE[kind]
    for key, item in value.items():
        if key not in fields:
            found.append(f"{path}.{key}")
        elif (inner := fields[key]) is not None:
            found += core_unknown_fields(item, inner, f"{path}.{key}")
    return found


def test_the_core_fields_the_crds_leave_unchecked_are_spelt_right() -> None:
    """The pod template and the sidecar's Container, which the CRD schemas
    let through unchecked, have only fields their Kubernetes types have
    (a SidecarSet container is a Container plus Kruise's fields, which the
    CRD checks)."""
    cloneset = yaml.safe_load((ROOT / "config/cloneset.yaml").read_text())
    assert core_unknown_fields(cloneset["spec"]["template"], "PodTemplateSpec") == []
    sidecarset = yaml.safe_load((ROOT / "config/sidecarset.yaml").read_text())
    _, schema = crd_schema("apps.kruise.io_sidecarsets.yaml")
    kruise_fields = schema["properties"]["spec"]["properties"]["containers"]["items"][
        "properties"]
    containers = [{k: v for k, v in c.items() if k not in kruise_fields}
                  for c in sidecarset["spec"]["containers"]]
    assert core_unknown_fields(containers, "Container") == []
    # It can fail: the misspellings the CRD check lets through.
    (container,) = containers
    security = container["securityContext"]
    security["readOnlyRootFileSystem"] = security.pop("readOnlyRootFilesystem")
    container["readinessProbe"]["period"] = 2
    assert core_unknown_fields(containers, "Container") == [
        "[0].readinessProbe.period", "[0].securityContext.readOnlyRootFileSystem"]


def test_the_app_does_not_run_as_the_sidecars_uid() -> None:
    """The sidecar's control socket takes a handover, its listening sockets
    and all, from a process of its own uid (and ``HOTSWAP_ALLOW_UIDS``): the
    app beside it, in the pod and in the container demo, runs as another."""
    def image_uid(dockerfile: str) -> str:
        users = re.findall(r"^USER (\d+)", (ROOT / dockerfile).read_text(), re.M)
        assert users, dockerfile
        return str(users[-1])

    sidecar = image_uid("Dockerfile.sidecar")
    assert image_uid("Dockerfile.empty") == sidecar
    assert image_uid("Dockerfile.busybox") != sidecar
    (slot,) = yaml.safe_load((ROOT / "config/sidecarset.yaml").read_text())["spec"]["containers"]
    assert str(slot["securityContext"]["runAsUser"]) == sidecar
    pod = yaml.safe_load((ROOT / "config/cloneset.yaml").read_text())["spec"]["template"]["spec"]
    for container in pod["containers"]:
        assert str(container["securityContext"]["runAsUser"]) != sidecar, container["name"]


def test_the_demos_containers_are_confined_as_the_pods() -> None:
    """The container demo runs its slots and its app as the manifests run
    them in a pod: read-only root, no capabilities, no privilege escalation
    (the demo's run shows the SCHED_IDLE start-up and the hook still work so)."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name in ("sidecar-1", "sidecar-2", "busybox"):
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_sidecarset_has_what_hot_upgrade_needs() -> None:
    sidecarset = yaml.safe_load((ROOT / "config/sidecarset.yaml").read_text())
    cloneset = yaml.safe_load((ROOT / "config/cloneset.yaml").read_text())
    (container,) = sidecarset["spec"]["containers"]
    strategy = container["upgradeStrategy"]
    assert strategy["upgradeType"] == "HotUpgrade"
    empty = strategy["hotUpgradeEmptyImage"]
    assert empty and empty != container["image"]
    # The empty slot runs this spec with its own image: its entrypoint, hook, probe.
    assert "command" not in container and "args" not in container
    hook = container["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[-1] == "/usr/local/bin/migrate.sh"
    probe = container["readinessProbe"]
    assert set(probe) & {"tcpSocket", "httpGet", "grpc"} == set(), \
        "a probe on the shared port cannot tell the slots apart"
    assert probe["exec"]["command"][-1] == "/usr/local/bin/probe.sh"
    # Both images carry the hook and the probe at those paths.
    for dockerfile in ("Dockerfile.sidecar", "Dockerfile.empty"):
        text = (ROOT / dockerfile).read_text()
        assert re.search(r"COPY scripts/migrate.sh scripts/probe.sh "
                         r"scripts/hotswap-marker.sh /usr/local/bin/", text)
    # Images are the ones the Dockerfiles build.
    assert container["image"].startswith("hotswap-sidecar:")
    assert empty.startswith("hotswap-empty:")
    # The SidecarSet selects the CloneSet's pods.
    labels = cloneset["spec"]["template"]["metadata"]["labels"]
    assert sidecarset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Same uid in every slot: the control socket admits only its own uid.
    assert container["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (ROOT / "Dockerfile.sidecar").read_text()
    # The drain deadline (25 s) fits in the pod's grace period.
    assert cloneset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def injected_pod() -> dict[str, Any]:
    """The CloneSet's pod spec as Kruise's webhook injects the SidecarSet
    into it: each HotUpgrade container twice, as NAME-1 and NAME-2 (the
    empty slot has the same spec, image aside)."""
    sidecarset = yaml.safe_load((ROOT / "config/sidecarset.yaml").read_text())
    cloneset = yaml.safe_load((ROOT / "config/cloneset.yaml").read_text())
    pod: dict[str, Any] = cloneset["spec"]["template"]["spec"]
    slots = [{**container, "name": f"{container['name']}-{n}"}
             for container in sidecarset["spec"]["containers"] for n in (1, 2)]
    return {**pod, "containers": slots + pod["containers"]}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What Kubernetes' Pod Security Standard "restricted" (the policy a
    namespace labelled pod-security.kubernetes.io/enforce=restricted
    admits) finds wrong in ``pod``: the fields these manifests could get
    wrong, each container's own securityContext over the pod's."""
    found = [f"spec.{key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    found += [f"volume {v['name']}: {kind}" for v in pod.get("volumes", [])
              for kind in v if kind not in ("name", "emptyDir", "configMap", "secret",
                                            "projected", "downwardAPI",
                                            "persistentVolumeClaim", "ephemeral")]
    pod_sc = pod.get("securityContext", {})
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container.get("securityContext", {})
        name = container["name"]

        def setting(key: str, sc: dict[str, Any] = sc) -> Any:
            return sc.get(key, pod_sc.get(key))

        if setting("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if setting("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {caps['add']}")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: no seccompProfile RuntimeDefault or Localhost")
    return found


def test_the_pods_meet_the_restricted_pod_security_standard() -> None:
    """A namespace that enforces the "restricted" Pod Security Standard
    admits the demo's pods, sidecar slots included. The SidecarSet's own
    container is restricted on its own too (it may be injected into pods
    that set nothing), and the seccomp profile is the runtime's default:
    the one the container demo runs under (SCHED_IDLE and nice 19 are
    allowed there). Without seccompProfile every pod was rejected there,
    and ran Unconfined where it was not; the busybox kept its
    capabilities."""
    assert restricted_violations(injected_pod()) == []
    sidecarset = yaml.safe_load((ROOT / "config/sidecarset.yaml").read_text())
    assert restricted_violations({"containers": sidecarset["spec"]["containers"]}) == []


def test_the_restricted_check_can_fail() -> None:
    pod = injected_pod()
    pod["containers"][0]["securityContext"] = {
        "runAsUser": 0, "runAsNonRoot": False, "privileged": True,
        "seccompProfile": {"type": "Unconfined"}}
    pod["hostIPC"] = True
    assert restricted_violations(pod) == [
        "spec.hostIPC", "sidecar-1: runAsNonRoot is not true", "sidecar-1: runAsUser 0",
        "sidecar-1: privileged", "sidecar-1: allowPrivilegeEscalation is not false",
        "sidecar-1: capabilities do not drop ALL",
        "sidecar-1: no seccompProfile RuntimeDefault or Localhost"]


def docker_available() -> str | None:
    """None if a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"no Docker engine answers `docker info`: {result.stderr.strip()[:200]}"
    return None


def need_docker() -> None:
    why = docker_available()
    if why is not None:
        if os.environ.get("HOTSWAP_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HOTSWAP_REQUIRE_DOCKER=1 but {why}")
        pytest.skip(f"container demo needs Docker: {why} "
                    "(run ../shared/tools/docker-up.sh, or make test in CI)")


def project_left(project: str, kind: str) -> str:
    """The ids of the compose project's containers or networks still there."""
    argv = (["docker", "ps", "-aq"] if kind == "containers"
            else ["docker", "network", "ls", "-q"])
    return subprocess.run([*argv, "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True, timeout=60).stdout.strip()


@pytest.mark.timeout(1800)
def test_compose_pod_demo_two_hot_upgrades_and_a_failed_one() -> None:
    """The emulated Kruise pod: a failed migration (hook non-zero, v1 serves
    on), then v1 -> v2 -> v3 with 0 failed busybox requests, old slots ending
    on the empty image, nothing restarted."""
    need_docker()
    project = f"hotswap-test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "scripts/demo_docker.py", "--failed-migration", "--project",
         project, "--dwell", "2"], cwd=ROOT, capture_output=True, text=True, timeout=1700)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    for line in ("ok   the failed migration's hook exits non-zero", "ok   migration to v2",
                 "ok   the hook saw v2 serve from its serving marker (no Python)",
                 "ok   readiness without Python: v2 serving, v1 superseded (serving marker)",
                 "ok   migration to v3", "ok   sidecar-1 is on the empty image",
                 "ok   sidecar-2 is on the empty image", "ok   sidecar-2 never restarted",
                 "0 failed, versions seen in order: v1 -> v2 -> v3", "PASS"):
        assert line in out, out[-6000:]
    sizes = dict(re.findall(r"^(hotswap-\S+)\s+([\d.]+) MB$", out, re.M))
    assert float(sizes["hotswap-empty:dev"]) * 20 < float(sizes["hotswap-sidecar:v1"])
    assert project_left(project, "containers") == "", "compose down removed every container"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["term", "hup"])
def test_a_stopped_container_demo_removes_its_pod(signum: signal.Signals) -> None:
    """``kill <pid>`` of the container demo, or its terminal closed, ends it
    through ``compose down``. The default action ended it alone and left the
    pod's containers running."""
    need_docker()
    project = f"hotswap-test-{uuid.uuid4().hex[:8]}"
    demo = subprocess.Popen(
        [sys.executable, "scripts/demo_docker.py", "--project", project, "--dwell", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not project_left(project, "containers"):  # the pod is up (not a sleep)
            assert demo.poll() is None, demo.communicate()[0]
            assert time.monotonic() < deadline, "no container came up"
            time.sleep(0.2)
        demo.send_signal(signum)
        out, _ = demo.communicate(timeout=120)
        assert demo.returncode == 128 + signum, out
        assert project_left(project, "containers") == "", out
        assert project_left(project, "networks") == "", out
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=30)
        # What a failing demo left: its containers, then its networks, by id.
        for argv, kind in ((["docker", "rm", "-f"], "containers"),
                           (["docker", "network", "rm"], "networks")):
            if ids := project_left(project, kind).split():
                subprocess.run([*argv, *ids], capture_output=True, timeout=120)

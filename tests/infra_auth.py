"""Which Ray nodes the files under infra/ start, and whether each of them checks a token.

Ray 2.60 turns token auth on for `ray start` only when RAY_AUTH_MODE=token is in its environment (or a token
already exists); otherwise every node serves the GCS, the Jobs API and its workers to anyone who reaches it. So a
node is safe when RAY_AUTH_MODE=token and a token source (RAY_AUTH_TOKEN from a secret, or RAY_AUTH_TOKEN_PATH)
are in its environment before `ray start`: with the mode set and no token, `ray start` refuses to start. KubeRay
starts the nodes of a RayCluster, RayJob or RayService itself: there `authOptions: {mode: token}` is what gives
every node, the operator and a RayJob's submitter the token. A token is never written in the repository.

Every file is classified; one of a kind the check does not know fails it, so a new file is checked too.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
KUBERAY_CLUSTER = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"),
                   "RayService": ("spec", "rayClusterConfig")}
# Documents that start no Ray node: Serve's own config (run by `serve run` on a Ray that exists), factory's serving
# config, and Kubernetes objects whose containers are checked for `ray start` like any other.
SERVE_CONFIG_KEYS = {"applications", "proxy_location"}
SERVING_CONFIG_KEYS = {"app_name", "profile"}
PLAIN_KUBERNETES = {"ServiceAccount", "Role", "RoleBinding", "CronJob", "Job", "Deployment", "Pod", "ConfigMap",
                    "Secret", "Service"}


@dataclass
class Findings:
    nodes: list[str] = field(default_factory=list)  # every Ray node (or Ray client) a file defines, as "file: what"
    problems: list[str] = field(default_factory=list)


def infra_files() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(INFRA.iterdir()) if path.is_file()}


def check(files: Mapping[str, str]) -> Findings:
    findings = Findings()
    for name, text in files.items():
        if name == "Dockerfile":
            check_dockerfile(name, text, findings)
        elif name == "cron":
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    check_shell(f"{name}:{number}", line.split(None, 5)[5], {}, findings)  # after the schedule
        elif name.endswith(".md"):
            for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
                check_shell(f"{name}: code block", block, {}, findings)
        elif name.endswith((".yaml", ".yml")):
            for number, document in enumerate(yaml.safe_load_all(text)):
                if document:
                    check_document(f"{name}#{number}", document, findings)
        else:
            findings.problems.append(f"{name}: a file the auth check does not know; teach tests/infra_auth.py it")
    return findings


def check_document(where: str, document: dict, findings: Findings) -> None:
    kind = document.get("kind")
    if kind in KUBERAY_CLUSTER:
        cluster = document
        for key in KUBERAY_CLUSTER[kind]:
            cluster = cluster[key]
        check_kuberay(f"{where} {kind}", cluster, findings)
    elif "head_start_ray_commands" in document:
        check_launcher(where, document, findings)
    elif kind in PLAIN_KUBERNETES:
        for container in containers_in(document):
            if "ray start" in " ".join(map(str, container.get("command", []) + container.get("args", []))):
                findings.nodes.append(f"{where} container {container['name']}")
                env = {entry["name"]: entry for entry in container.get("env", [])}
                mode = env.get("RAY_AUTH_MODE", {}).get("value")
                if mode != "token" or not any(name in env for name in TOKEN_SOURCES):
                    findings.problems.append(f"{where} container {container['name']}: `ray start` without "
                                             "RAY_AUTH_MODE=token and a token source")
            check_container_env(f"{where} container {container.get('name')}", container, findings)
    elif not (SERVE_CONFIG_KEYS <= set(document) or SERVING_CONFIG_KEYS <= set(document)):
        findings.problems.append(f"{where}: a document the auth check does not know; teach tests/infra_auth.py it")


def check_kuberay(where: str, cluster: dict, findings: Findings) -> None:
    """KubeRay starts these nodes: `authOptions: {mode: token}` on the cluster gives each of them (and the
    operator, and a RayJob's submitter) the token; an explicit env entry must not undo it."""
    authenticated = (cluster.get("authOptions") or {}).get("mode") == "token"
    groups = [("head", cluster["headGroupSpec"])] + [
        (group["groupName"], group) for group in cluster.get("workerGroupSpecs", [])]
    for name, group in groups:
        what = f"{where} {name} group"
        findings.nodes.append(what)
        if not authenticated:
            findings.problems.append(f"{what}: no authOptions {{mode: token}}: its Ray starts with auth off")
        if str(group.get("rayStartParams", {}).get("dashboard-host")) == "0.0.0.0" and not authenticated:
            findings.problems.append(f"{what}: dashboard on 0.0.0.0 without token auth")
        for container in group["template"]["spec"]["containers"]:
            check_container_env(f"{what} container {container['name']}", container, findings)


def check_container_env(where: str, container: dict, findings: Findings) -> None:
    for entry in container.get("env", []):
        if entry["name"] == "RAY_AUTH_MODE" and entry.get("value") != "token":
            findings.problems.append(f"{where}: RAY_AUTH_MODE={entry.get('value')!r} turns token auth off")
        if entry["name"] == "RAY_AUTH_TOKEN" and "secretKeyRef" not in (entry.get("valueFrom") or {}):
            findings.problems.append(f"{where}: RAY_AUTH_TOKEN not from a Secret (a token written in the repo?)")


def containers_in(node) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers_in(item)


def launcher_environment(document: dict) -> tuple[dict[str, str], dict[str, str]]:
    """The environment and the mounts (container path -> host path) the cluster launcher gives every node's
    container, from `docker.run_options`."""
    env, mounts = {}, {}
    for option in document.get("docker", {}).get("run_options", []):
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            key, _, value = words[1].partition("=")
            env[key] = value
        elif words[0] in ("-v", "--volume"):
            host, container = words[1].split(":")[:2]
            mounts[container] = host
    return env, mounts


def check_launcher(where: str, document: dict, findings: Findings) -> None:
    env, mounts = launcher_environment(document)
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path is not None and path not in mounts:
        findings.problems.append(f"{where}: RAY_AUTH_TOKEN_PATH={path} is not mounted into the container")
    for key, commands in document.items():
        if key.endswith("_commands"):
            for command in commands:
                check_shell(f"{where} {key}", command, env, findings)


def check_dockerfile(name: str, text: str, findings: Findings) -> None:
    """The image's own environment: every Ray process of it checks tokens, and no token is baked in."""
    joined = text.replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in joined.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest) if "=" in word)
        if instruction in ("ENV", "ARG") and re.search(r"\bRAY_AUTH_TOKEN\b", rest):
            findings.problems.append(f"{name}: {instruction} RAY_AUTH_TOKEN: a token in the image")
        if instruction in ("RUN", "CMD", "ENTRYPOINT"):
            check_shell(f"{name}: {instruction}", rest, env, findings)
    findings.nodes.append(f"{name}: the image's environment")
    if env.get("RAY_AUTH_MODE") != "token":
        findings.problems.append(f"{name}: no ENV RAY_AUTH_MODE=token: a node of this image starts with auth off "
                                 "unless its launcher says otherwise")


RAY_COMMANDS = (("ray", "start"), ("ray", "job"))  # nodes, and clients of the Jobs API (they present the token)


def check_shell(where: str, text: str, environment: Mapping[str, str], findings: Findings) -> None:
    """Each `ray start` / `ray job ...` in `text` runs with RAY_AUTH_MODE=token and a token source in its
    environment: `environment`, what `export` set before it, and its own leading assignments."""
    exported = dict(environment)
    for simple in re.split(r"\s*(?:;|&&|\|\||\||\n)\s*", text.replace("\\\n", " ")):
        try:
            words = shlex.split(simple, comments=True)
        except ValueError:
            words = simple.split()
        if words[:1] == ["export"]:
            exported.update(word.split("=", 1) for word in words[1:] if "=" in word)
            continue
        local = dict(exported)
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            local[key] = value
        if tuple(words[:2]) not in RAY_COMMANDS:
            continue
        what = f"{where}: `{' '.join(words[:3])}`"
        findings.nodes.append(what)
        if local.get("RAY_AUTH_MODE") != "token":
            findings.problems.append(f"{what} without RAY_AUTH_MODE=token (Ray's default is auth off)")
        if not any(local.get(name) for name in TOKEN_SOURCES):
            findings.problems.append(f"{what} without a token source (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
        token = local.get("RAY_AUTH_TOKEN", "")
        if token and not token.startswith("$"):
            findings.problems.append(f"{what}: a token written in the repo")


def launcher_head_start(document: dict) -> list[str]:
    """The `ray start` arguments of the launcher's head node, as its start command gives them."""
    for command in document["head_start_ray_commands"]:
        for simple in re.split(r"\s*(?:;|&&)\s*", command):
            words = shlex.split(simple)
            if words[:2] == ["ray", "start"]:
                return words[2:]
    raise AssertionError("no `ray start` among head_start_ray_commands")

"""Every Ray node the files under infra/ start checks a token (tests/infra_auth.py says how that is judged), and
the check itself fails when any one file loses its protection."""

from __future__ import annotations

import pytest

from tests.infra_auth import REPO, check, infra_files


def test_every_ray_node_under_infra_checks_a_token():
    findings = check(infra_files())
    assert findings.problems == []
    # The check found the nodes it should have: a check that finds nothing passes nothing.
    by_file: dict[str, int] = {}
    for node in findings.nodes:
        name = node.split("#")[0].split(":")[0]
        by_file[name] = by_file.get(name, 0) + 1
    assert by_file == {"Dockerfile": 1, "cluster.yaml": 2, "cron": 1, "rayjob.yaml": 2, "rayservice.yaml": 2}


# Each removes one protection from one real file; the first string must be in the file, so the case stays real.
UNPROTECTED = {
    "rayjob without authOptions": ("rayjob.yaml", "authOptions: {mode: token, secretName: factory-ray-token}", ""),
    "rayjob env turns auth off": ("rayjob.yaml", "{name: RAY_AUTH_MODE, value: token}",
                                  "{name: RAY_AUTH_MODE, value: disabled}"),
    "rayjob token written in": ("rayjob.yaml",
                                "valueFrom: {secretKeyRef: {name: factory-ray-token, key: auth_token}}",
                                "value: 3f9a0c"),
    "rayservice without authOptions": ("rayservice.yaml",
                                       "authOptions: {mode: token, secretName: factory-ray-token}", ""),
    "launcher without RAY_AUTH_MODE": ("cluster.yaml", "    - --env RAY_AUTH_MODE=token\n", ""),
    "launcher without a token": ("cluster.yaml", "    - --env RAY_AUTH_TOKEN_PATH=/run/secrets/ray_auth_token\n",
                                 ""),
    "launcher token file not mounted": ("cluster.yaml",
                                        "    - -v /etc/factory/ray_auth_token:/run/secrets/ray_auth_token:ro\n", ""),
    "launcher head turns auth off": ("cluster.yaml", "ray start --head", "RAY_AUTH_MODE=disabled ray start --head"),
    "image without RAY_AUTH_MODE": ("Dockerfile", " \\\n    RAY_AUTH_MODE=token", ""),
    "image with a baked token": ("Dockerfile", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=3f9a0c"),
    "cron without RAY_AUTH_MODE": ("cron", "RAY_AUTH_MODE=token ", ""),
    "docs start an open head": ("s3.md", "```bash\n", "```bash\nray start --head --dashboard-host=0.0.0.0\n"),
}


@pytest.mark.parametrize("case", sorted(UNPROTECTED))
def test_the_check_fails_when_one_file_loses_its_protection(case):
    name, protected, unprotected = UNPROTECTED[case]
    files = infra_files()
    assert protected in files[name], f"{case}: the file no longer has {protected!r}"
    files[name] = files[name].replace(protected, unprotected, 1)
    problems = check(files).problems
    assert problems and all(problem.startswith(name) for problem in problems), problems


def test_a_file_the_check_does_not_know_fails_it():
    files = {**infra_files(), "start-head.sh": "ray start --head\n"}
    assert check(files).problems == ["start-head.sh: a file the auth check does not know; teach tests/infra_auth.py it"]
    files = {"extra.yaml": "apiVersion: v1\nkind: Widget\n"}
    assert "a document the auth check does not know" in check(files).problems[0]


def test_the_readme_shows_the_token_before_ray_start():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### On a Ray cluster"):]
    section = section[:section.index("\n### ", 4)]
    findings = check({"README.md": section})
    assert findings.problems == []
    assert any("`ray start --head" in node for node in findings.nodes), findings.nodes

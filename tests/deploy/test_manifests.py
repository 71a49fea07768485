"""deploy/ (the compose file, the Kubernetes manifests, the Dockerfiles) cannot run on this machine (no
Docker engine, no cluster); these checks keep them true to the code instead:

* every ``hematovision ...`` command they run exists in the CLI, with the options it is given;
* every ``HEMATOVISION_*`` variable they set is a setting, and the values they give are valid;
* every ``http://host:port`` they point a component at is a port that component listens on, and the
  service and the Evidently UI listen where the CLI's commands would (``serve``, ``monitor ui``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import typer.main
import yaml

from hematovision.cli import app
from hematovision.settings import ENV_PREFIX, Settings, check_environment, environment_names

from conftest import REPO

DEPLOY = REPO / "deploy"
MANIFESTS = sorted([DEPLOY / "compose.yaml", *(DEPLOY / "k8s").glob("*.yaml")])
VARIABLE = re.compile(r"\bHEMATOVISION_[A-Z0-9_]+\b")
URL = re.compile(r"\b(?:https?|postgresql\+\w+)://(?:[\w.-]+@)?([\w.-]+):(\d+)")


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def commands() -> list[list[str]]:
    found = []
    for _, doc in documents():
        for node in walk(doc):
            if isinstance(node, list) and node and node[0] == "hematovision":
                found.append([str(t) for t in node])
            elif isinstance(node, str) and node.startswith("hematovision "):
                found.append(node.split())
    for path in DEPLOY.glob("*Dockerfile"):  # commands named in their comments, `hematovision ...`
        found += [["hematovision", *m.split()] for m in re.findall(r"`hematovision ([^`]*)`", path.read_text())]
    return found


def environments() -> list[dict[str, str]]:
    """Every set of variables a container gets: compose ``environment`` maps, ConfigMaps, ``env`` lists."""
    found = []
    for _, doc in documents():
        if doc.get("kind") == "ConfigMap":
            found.append({k: str(v) for k, v in doc["data"].items()})
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("environment"), dict):
                found.append({k: str(v) for k, v in node["environment"].items()})
            if isinstance(node, dict) and isinstance(node.get("env"), list):
                found.append({e["name"]: str(e.get("value", "")) for e in node["env"]})
    return found


def listening() -> set[tuple[str, int]]:
    """(name other containers reach it by, port) for every compose service and Kubernetes Service."""
    ports = set()
    for _, doc in documents():
        for name, service in (doc.get("services") or {}).items():
            for spec in [*service.get("ports", []), *service.get("expose", [])]:
                ports.add((name, int(str(spec).split(":")[-1])))
        if doc.get("kind") == "Service":
            ports |= {(doc["metadata"]["name"], int(p["port"])) for p in doc["spec"]["ports"]}
    return ports


def cli_command(tokens: list[str]):
    """The click command ``hematovision TOKENS...`` runs; fails the test on an unknown one or option.
    (Typer may bring its own copy of click: groups are recognised by their ``commands``.)"""
    command = typer.main.get_command(app)
    args = tokens[1:]
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        assert args[0] in command.commands, f"`{' '.join(tokens)}`: no command {args[0]!r} in `{command.name}`"
        command, args = command.commands[args[0]], args[1:]
    assert not hasattr(command, "commands"), f"`{' '.join(tokens)}` names a group, not a command"
    options = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for arg in args:
        if arg.startswith("-"):
            assert arg.split("=")[0] in options, f"`{' '.join(tokens)}`: {command.name} has no option {arg}"
    return command


def option_default(path: list[str], name: str):
    command = cli_command(["hematovision", *path])
    return next(p.default for p in command.params if p.name == name)


def test_the_manifests_are_there():
    assert (DEPLOY / "compose.yaml").exists() and len(MANIFESTS) >= 3
    assert commands(), "no hematovision command found in deploy/: the checks below would check nothing"


@pytest.mark.parametrize("tokens", commands(), ids=" ".join)
def test_every_command_exists_in_the_cli(tokens):
    cli_command(tokens)


def test_every_variable_is_a_setting_with_a_valid_value(monkeypatch):
    known = environment_names()
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    unknown = sorted(set(VARIABLE.findall(text)) - set(known))
    assert not unknown, f"deploy/ sets variables no setting reads: {unknown}"
    for env in environments():
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                monkeypatch.delenv(key)
        for key, value in ours.items():
            monkeypatch.setenv(key, value)
        check_environment()
        Settings()  # every value parses (types, ranges, choices)


def test_every_url_points_at_a_port_its_component_listens_on():
    ports = listening()
    for env in environments():
        for key, value in env.items():
            for host, port in URL.findall(value):
                assert (host, int(port)) in ports, f"{key}={value}: nothing listens on {host}:{port} ({sorted(ports)})"
    for _, doc in documents():
        for node in walk(doc):
            if isinstance(node, list) and "--backend-store-uri" in node:
                for host, port in URL.findall(str(node[node.index("--backend-store-uri") + 1])):
                    assert (host, int(port)) in ports


def test_the_service_and_the_ui_listen_where_the_commands_do():
    ports = listening()
    assert ("service", option_default(["serve"], "port")) in ports  # the bento's `bentoml serve` uses 3000 too
    assert ("evidently", option_default(["monitor", "ui"], "port")) in ports
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    pools = {
        doc_cmd[doc_cmd.index("--pool") + 1]
        for doc_cmd in (s.get("command") or [] for s in compose.values())
        if "--pool" in doc_cmd
    }
    config = next(doc for _, doc in documents() if doc.get("kind") == "ConfigMap")["data"]
    assert pools == {config["HEMATOVISION_DEPLOY_WORK_POOL"], config["HEMATOVISION_DEPLOY_TRAINING_WORK_POOL"]}

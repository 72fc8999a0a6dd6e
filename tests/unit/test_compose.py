"""The compose stack and the relay image, checked without a Docker engine.

* ``compose.yaml`` is valid under the Compose Specification (the JSON schema vendored in
  ``tests/data/compose-spec.schema.json``, see ``tests/data/compose-spec.README.md``);
* every file that ``compose.yaml``, the ``Dockerfile`` and the Grafana provisioning name exists,
  and ``.dockerignore`` lets the Dockerfile's sources into the build context;
* healthchecks and the start order (``depends_on: condition: service_healthy``);
* the services agree with each other: the relay's database URL and Kafka address, its HTTP port,
  Prometheus' target, Grafana's datasource and dashboard paths, the demo producer's table;
* the image: multi-stage, a pinned slim base, no build tools in the final stage, a non-root
  user, ``EXPOSE``, ``HEALTHCHECK``, the entrypoint script.

The same files run natively in ``tests/integration/test_compose_native.py``; the helpers here
(``load_compose``, ``dockerfile_stages``, ``relay_entrypoint``...) are shared with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.schema.json"
SCHEMA_README = ROOT / "tests" / "data" / "compose-spec.README.md"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# Written by the dashboard's author (deploy/grafana/README.md); the stack provisions it.
DASHBOARD = "deploy/grafana/outbox-cdc.json"
ENTRYPOINT_SCRIPT = "deploy/relay-entrypoint.sh"

SERVICES = {"postgres", "kafka", "relay", "demo-producer", "prometheus", "grafana"}
HEALTHCHECKED = {"postgres", "kafka", "relay", "prometheus"}
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|libpq-dev|python3-dev|cmake|rustc|cargo)\b"
)


# -- helpers, shared with tests/integration/test_compose_native.py --------------------------------


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), "compose.yaml is not a mapping"
    return doc


def service(name: str) -> dict[str, Any]:
    svc = load_compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict of strings (mapping or list form)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path relative to the repository, container path) of each bind mount."""
    mounts = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def host_path(source: str) -> Path:
    return (ROOT / source).resolve()


def command_list(value: Any) -> list[str]:
    """A compose ``command``/``entrypoint``/healthcheck ``test``: list form, or a string that
    compose splits like a shell would."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuations joined

    def json_args(self) -> list[str] | None:
        """The exec form (JSON array) of CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            # options first, then CMD ...
            match = re.search(r"\bCMD\s+(.*)$", text, re.S)
            if not match:
                return None
            text = match.group(1)
        text = text.strip()
        if not text.startswith("["):
            return None
        return [str(v) for v in json.loads(text)]


@dataclass
class Stage:
    base: str  # after ARG substitution
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    """Logical instructions of the Dockerfile: comment lines dropped (also inside a
    continuation, as Docker does), backslash continuations joined."""
    if text is None:
        text = DOCKERFILE.read_text(encoding="utf-8")
    instructions: list[Instruction] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current.append(line[:-1].strip())
            continue
        current.append(line)
        logical = " ".join(current)
        current = []
        keyword, _, args = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), value
    )


def dockerfile_stages() -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in dockerfile_instructions():
        if ins.keyword == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_expand(words[0], global_args), name))
        else:
            assert stages, f"{ins.keyword} before the first FROM"
            stages[-1].instructions.append(ins)
    return stages


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, --options) of a COPY/ADD instruction (shell form)."""
    words = shlex.split(ins.args)
    options = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        options[key] = value
    return words[:-1], words[-1], options


def relay_entrypoint() -> tuple[Path, list[str]]:
    """The relay container's command, as the repository file it runs and its arguments: the
    final stage's ENTRYPOINT (plus the compose ``command``), mapped back through the COPY that
    put the script into the image."""
    final = dockerfile_stages()[-1]
    (entry,) = final.all("ENTRYPOINT")
    argv = entry.json_args()
    assert argv, "ENTRYPOINT must use the exec form (JSON array) so the relay is PID 1"
    copied = {}
    for ins in final.all("COPY"):
        sources, dest, options = copy_sources(ins)
        if "from" not in options and len(sources) == 1:
            copied[dest] = sources[0]
    assert argv[0] in copied, f"ENTRYPOINT {argv[0]} is not a file the final stage copies"
    relay = service("relay")
    return ROOT / copied[argv[0]], argv[1:] + command_list(relay.get("command"))


def healthcheck_argv(test: list[str]) -> list[str]:
    """A healthcheck ``test`` as argv (CMD form) or ``sh -c`` (CMD-SHELL)."""
    kind, rest = test[0], test[1:]
    if kind == "CMD":
        return rest
    assert kind == "CMD-SHELL", f"healthcheck test kind {kind}"
    return ["/bin/sh", "-c", " ".join(rest)]


# -- dockerignore --------------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(relpath: str) -> bool:
    """Whether Docker leaves ``relpath`` out of the build context: the last pattern that
    matches the path or one of its parent directories decides; ``!`` lets it back in."""
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, _ignore_regex(os.path.normpath(line.lstrip("!")).lstrip("/"))))
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# -- the compose file as a whole -----------------------------------------------------------------


def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def test_compose_file_is_valid_under_the_compose_specification() -> None:
    errors = sorted(_validator().iter_errors(load_compose()), key=lambda e: e.json_path)
    details = [
        f"{e.json_path}: {jsonschema.exceptions.best_match([e, *e.context]).message}"
        for e in errors
    ]
    assert not details, "compose.yaml does not match the Compose Specification:\n" + "\n".join(
        details
    )


def test_schema_validation_catches_the_usual_mistakes() -> None:
    """The validation is not vacuous: a misspelt key, a wrong depends_on condition and a
    number where compose wants a duration are refused."""
    validator = _validator()
    for path, value in [
        (("relay", "helthcheck"), {"test": ["CMD", "true"]}),
        (("relay", "depends_on", "kafka", "condition"), "service_healty"),
        (("relay", "healthcheck", "interval"), 5),
    ]:
        doc = load_compose()
        target = doc["services"]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert not validator.is_valid(doc), f"services.{'.'.join(path)} = {value!r} was accepted"


def test_vendored_schema_is_the_one_its_readme_describes() -> None:
    readme = SCHEMA_README.read_text(encoding="utf-8")
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert digest in readme, "tests/data/compose-spec.schema.json changed: update its README"
    assert "Apache License 2.0" in readme
    license_text = (SCHEMA_FILE.parent / "compose-spec.LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text
    assert "Version 2.0" in license_text


def test_the_stack_has_its_services() -> None:
    assert set(load_compose()["services"]) == SERVICES


# -- files ---------------------------------------------------------------------------------------


def test_every_file_the_compose_file_names_exists() -> None:
    compose = load_compose()
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = host_path(build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} is missing"
            if "dockerfile_inline" not in build:
                dockerfile = context / build.get("dockerfile", "Dockerfile")
                assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        for source, _target in bind_mounts(svc):
            path = host_path(source)
            assert path.exists(), f"{name}: mounted {source} is missing"
            assert ROOT in path.parents, f"{name}: {source} is outside the repository"


def test_the_dashboard_is_provisioned_from_its_file() -> None:
    """Grafana mounts deploy/grafana/outbox-cdc.json (written by the dashboard's author) into
    the directory its dashboard provider reads, and makes it the home dashboard."""
    grafana = service("grafana")
    mounts = dict(bind_mounts(grafana))
    assert f"./{DASHBOARD}" in mounts, f"grafana does not mount ./{DASHBOARD}"
    assert (ROOT / DASHBOARD).is_file(), f"{DASHBOARD} is missing"
    json.loads((ROOT / DASHBOARD).read_text(encoding="utf-8"))
    target = mounts[f"./{DASHBOARD}"]

    provisioning = [t for s, t in mounts.items() if s == "./deploy/grafana/provisioning"]
    assert provisioning == ["/etc/grafana/provisioning"]
    (provider_file,) = (GRAFANA_PROVISIONING / "dashboards").glob("*.yml")
    providers = yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"]
    assert any(
        p["type"] == "file" and p["options"]["path"] == str(Path(target).parent) for p in providers
    ), f"no dashboard provider reads {Path(target).parent}"
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == target


def test_grafana_datasource_is_the_stacks_prometheus() -> None:
    (datasource_file,) = (GRAFANA_PROVISIONING / "datasources").glob("*.yml")
    doc = yaml.safe_load(datasource_file.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["isDefault"] is True
    url = urlsplit(ds["url"])
    prometheus = service("prometheus")
    published = [str(p).rsplit(":", 1)[-1] for p in prometheus.get("ports", [])]
    assert url.hostname == "prometheus"
    assert str(url.port) in published


def test_dashboard_finds_the_provisioned_datasource() -> None:
    """Every datasource the dashboard names is a template variable, Grafana's own, or the
    provisioned one; a datasource variable's default is the provisioned one."""
    (datasource_file,) = (GRAFANA_PROVISIONING / "datasources").glob("*.yml")
    (ds,) = yaml.safe_load(datasource_file.read_text(encoding="utf-8"))["datasources"]
    dashboard = json.loads((ROOT / DASHBOARD).read_text(encoding="utf-8"))
    variables = {
        v["name"]: v for v in dashboard.get("templating", {}).get("list", []) if "name" in v
    }

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for ref in walk(dashboard):
        uid = str(ref.get("uid", ""))
        if uid.startswith("$"):
            name = uid.strip("${}")
            assert name in variables, f"the dashboard uses ${name}, not a variable of it"
            assert variables[name]["type"] == "datasource"
            assert variables[name]["query"] == ds["type"]
            default = variables[name].get("current", {}).get("value")
            assert default in (None, "", ds["uid"], ds["name"]), default
        elif ref.get("type") != "grafana":
            assert uid == ds["uid"], f"the dashboard names datasource {uid!r}"


def test_prometheus_scrapes_the_relay() -> None:
    prometheus = service("prometheus")
    mounts = dict(bind_mounts(prometheus))
    assert mounts.get("./deploy/prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in command_list(prometheus.get("command"))
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    port = environment(service("relay"))["OUTBOX_CDC_HTTP_PORT"]
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert ("/metrics", f"relay:{port}") in targets


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    for stage in dockerfile_stages():
        for ins in stage.all("COPY") + stage.all("ADD"):
            sources, _dest, options = copy_sources(ins)
            if "from" in options:
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: missing"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if "__pycache__" in rel or rel.endswith((".pyc", ".pyo")):
                        assert dockerignore_excludes(rel)
                    else:
                        assert not dockerignore_excludes(rel), f".dockerignore excludes {rel}"
    for private in (".venv/bin/python", ".git/HEAD", ".services.env", "tests/conftest.py"):
        assert dockerignore_excludes(private), f".dockerignore lets {private} in"


# -- healthchecks and start order ----------------------------------------------------------------


def test_healthchecks() -> None:
    compose = load_compose()
    for name in HEALTHCHECKED:
        check = compose["services"][name].get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    postgres = healthcheck_argv(service("postgres")["healthcheck"]["test"])
    assert postgres[0] == "pg_isready"
    assert "-h" in postgres, "pg_isready over the Unix socket passes during the first-run setup"
    kafka = " ".join(healthcheck_argv(service("kafka")["healthcheck"]["test"]))
    assert re.search(r"/opt/kafka/bin/kafka-(broker-api-versions|topics)\.sh", kafka)
    relay = healthcheck_argv(service("relay")["healthcheck"]["test"])
    assert relay[:2] == ["python", "-c"], "the slim image has no curl: use Python's urllib"
    assert "urllib" in relay[2]
    assert "/healthz" in relay[2]


def test_relay_healthcheck_is_the_images() -> None:
    (healthcheck,) = dockerfile_stages()[-1].all("HEALTHCHECK")
    assert healthcheck.json_args() == healthcheck_argv(service("relay")["healthcheck"]["test"])


def test_services_start_in_order_once_their_dependencies_are_healthy() -> None:
    compose = load_compose()
    expected = {
        "relay": {"postgres", "kafka"},
        "demo-producer": {"relay"},
        "grafana": {"prometheus"},
    }
    for name, svc in compose["services"].items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form (condition)"
        assert set(depends) == expected.get(name, set()), name
        for dependency, spec in depends.items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
            check = compose["services"][dependency].get("healthcheck")
            assert check and not check.get("disable"), f"{dependency} has no healthcheck"


# -- the services agree with each other ----------------------------------------------------------


def test_postgres_has_wal2json_and_logical_decoding() -> None:
    postgres = service("postgres")
    dockerfile = postgres["build"]["dockerfile_inline"]
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert re.fullmatch(r"postgres:15(\.\d+)?(-bookworm)?", base), base
    assert "postgresql-15-wal2json" in dockerfile
    command = " ".join(command_list(postgres["command"]))
    assert "wal_level=logical" in command
    assert re.search(r"max_slot_wal_keep_size=\d+[kMGT]B", command)


def test_kafka_is_one_kraft_node_the_relay_can_reach() -> None:
    kafka = service("kafka")
    assert kafka["image"].startswith("apache/kafka:")
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])
    env = environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    advertised = dict(
        listener.split("://", 1) for listener in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    relay = environment(service("relay"))
    assert advertised["PLAINTEXT"] == relay["OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS"]


def test_relay_settings_are_valid_and_point_at_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    from outbox_cdc.settings import Settings

    relay = environment(service("relay"))
    postgres = environment(service("postgres"))
    url = urlsplit(relay["OUTBOX_CDC_DATABASE_URL"])
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]

    unknown = [
        k
        for k in relay
        if not k.startswith("OUTBOX_CDC_")
        or k.removeprefix("OUTBOX_CDC_").lower() not in Settings.model_fields
    ]
    assert not unknown, f"not settings of outbox-cdc: {unknown}"
    for name in list(os.environ):
        if name.startswith("OUTBOX_CDC_"):
            monkeypatch.delenv(name)
    for name, value in relay.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises on an invalid value
    assert settings.http_port is not None
    assert not settings.polling

    port = str(settings.http_port)
    assert f"127.0.0.1:{port}:{port}" in service("relay").get("ports", [])
    final = dockerfile_stages()[-1]
    exposed = [p for ins in final.all("EXPOSE") for p in ins.args.split()]
    assert port in exposed or f"{port}/tcp" in exposed


def test_demo_producer_writes_where_the_relay_reads() -> None:
    producer = service("demo-producer")
    env = environment(producer)
    relay = environment(service("relay"))
    assert set(env) <= {
        "DEMO_DATABASE_URL",
        "DEMO_TABLE",
        "DEMO_TOPIC",
        "DEMO_INTERVAL",
        "DEMO_EVENTS",
        "DEMO_KEYS",
    }
    assert env["DEMO_DATABASE_URL"] == relay["OUTBOX_CDC_DATABASE_URL"]
    assert env["DEMO_TABLE"] == relay["OUTBOX_CDC_TABLE"]
    assert env["DEMO_EVENTS"] == "0", "the stack's producer runs until the stack stops"
    script, _env = demo_producer_command()
    assert script[1].endswith("demo_producer.py")
    text = Path(script[1]).read_text(encoding="utf-8")
    for name in env:
        assert name in text, f"{name} is not read (or documented) by {script[1]}"
    # the image's /healthz check would fail in the producer's container
    assert producer["healthcheck"] == {"disable": True}


def demo_producer_command() -> tuple[list[str], dict[str, str]]:
    """The demo producer's compose ``entrypoint`` as a native command: the container path of
    the script mapped back to the repository through its bind mount, ``python`` = this
    interpreter (the image's Python runs the relay's own package)."""
    producer = service("demo-producer")
    argv = command_list(producer["entrypoint"]) + command_list(producer.get("command"))
    assert argv[0] == "python", argv
    mounts = bind_mounts(producer)
    native = [sys.executable]
    for arg in argv[1:]:
        for source, target in mounts:
            if arg.startswith(target.rstrip("/") + "/"):
                arg = str(host_path(source) / arg[len(target.rstrip("/")) + 1 :])
        native.append(arg)
    assert Path(native[1]).is_file(), f"{argv[1]} is not in a mounted directory"
    return native, environment(producer)


def test_demo_producer_refuses_a_missing_database_url() -> None:
    argv, _ = demo_producer_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "DEMO_DATABASE_URL is required" in result.stderr


# -- the image -----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert stages[0].name == "builder"
    for stage in stages:
        assert re.fullmatch(
            r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.base
        ), f"base image {stage.base} is not pinned to a Python 3.11 patch release"
    builder = stages[0]
    assert any("pip wheel" in ins.args for ins in builder.all("RUN"))


def test_final_stage_installs_only_the_wheels() -> None:
    final = dockerfile_stages()[-1]
    for ins in final.all("RUN"):
        assert not BUILD_TOOLS.search(ins.args), f"build tools in the final stage: {ins.args}"
        assert "apt-get install" not in ins.args
    installs = [ins.args for ins in final.all("RUN") if "pip install" in ins.args]
    assert len(installs) == 1
    assert "--no-index" in installs[0]
    assert "from=builder" in installs[0]
    for ins in final.all("COPY"):
        sources, _dest, options = copy_sources(ins)
        assert "." not in sources, "the final stage copies the whole build context"
        assert options.get("from") in (None, "builder")


def test_relay_runs_as_a_non_root_user() -> None:
    final = dockerfile_stages()[-1]
    users = final.all("USER")
    assert users, "the final stage has no USER: the relay would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    # a numeric uid lets Kubernetes' runAsNonRoot verify it
    assert user.isdigit()
    assert any(user in ins.args for ins in final.all("RUN") if "useradd" in ins.args)
    relay = service("relay")
    assert relay.get("user") in (None, users[-1].args), "compose overrides the image's user"


def test_relay_command_is_the_entrypoint_script() -> None:
    """One place: deploy/relay-entrypoint.sh, the image's ENTRYPOINT; compose adds nothing."""
    relay = service("relay")
    assert "entrypoint" not in relay
    assert "command" not in relay
    script, args = relay_entrypoint()
    assert script == ROOT / ENTRYPOINT_SCRIPT
    assert args == []
    assert script.stat().st_mode & stat.S_IXUSR, f"{ENTRYPOINT_SCRIPT} is not executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")  # the slim image's shell
    init = text.index("outbox-cdc init")
    start = text.index("exec outbox-cdc start")
    assert init < start


# -- docs ----------------------------------------------------------------------------------------


def test_compose_quickstart_matches_the_stack() -> None:
    doc = (ROOT / "docs" / "compose.md").read_text(encoding="utf-8")
    for text in (
        "docker compose up",
        "docker compose down -v",
        "kafka-console-consumer.sh",
        "localhost:3000",
        "localhost:9090",
        "scripts/demo.sh",
        environment(service("demo-producer"))["DEMO_TOPIC"],
    ):
        assert text in doc, f"docs/compose.md does not mention {text!r}"

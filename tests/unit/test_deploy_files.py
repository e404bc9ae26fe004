"""`deploy/` and `docs/metrics.md`: files parse, queries name real metric families, configs pass."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main as gateway_main
from gateway.edge.request_log import NO_MODEL_LABEL
from tests.support.promql import metric_families, promql_references, query_problems

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "affinity-gateway.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
METRICS_DOC = PROJECT_ROOT / "docs" / "metrics.md"
NGINX_INSTALL_HINT = (
    "nginx is required to validate deploy/nginx.conf: install it with `apt-get install -y nginx` "
    "(the project's test script does this)"
)
# The values check-config sees for deploy/gateway.yaml's ${VAR}s (and the k8s ConfigMap's).
CONFIG_VARIABLES = {
    "DATABASE_URL": "postgresql://gateway:secret@postgres:5432/gateway",
    "GATEWAY_ADMIN_TOKEN": "admin-token-for-the-check",
    "ACME_CI_KEY": "sk-acme-ci-for-the-check",
    "ACME_DEV_KEY": "sk-acme-dev-for-the-check",
    "HOSTED_1_KEY": "hosted-key-for-the-check",
}
# Labels Prometheus attaches to every scraped series.
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?][^}]*)?\}")


def dashboard_expressions(node: Any) -> Iterator[str]:
    """Every target expression anywhere in the dashboard JSON."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        for value in node.values():
            yield from dashboard_expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_expressions(item)


def alert_rules() -> list[dict[str, Any]]:
    """The rules of deploy/prometheus-alerts.yml."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    """deploy/docker-compose.yml."""
    document: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return document


def k8s_documents() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s, by kind."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            documents[document["kind"]] = document
    return documents


def config_variables(document: Any) -> set[str]:
    """The ${VAR} names the string values of a parsed YAML document refer to (not comments)."""
    if isinstance(document, str):
        return {match.group(1) for match in VARIABLE.finditer(document)}
    if isinstance(document, dict):
        values = [*document.keys(), *document.values()]
    elif isinstance(document, list):
        values = document
    else:
        return set()
    return set().union(*(config_variables(value) for value in values))


def test_every_deploy_yaml_file_parses() -> None:
    """Each YAML file under deploy/ is valid YAML with at least one document."""
    paths = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    assert len(paths) >= 10
    for path in paths:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        assert documents, path
        assert all(document is not None for document in documents), path


def test_query_check_rejects_unknown_series_and_labels() -> None:
    """The PromQL check itself fails on a misspelt family, a wrong label or a bad grouping."""
    families = metric_families()
    assert query_problems("sum(rate(gateway_requests_total[5m]))", families) == []
    assert query_problems("sum(rate(gateway_request_total[5m]))", families) == [
        "unknown series gateway_request_total"
    ]
    assert query_problems('gateway_provider_load{model="x"}', families) == [
        "gateway_provider_load has no label ['model']"
    ]
    assert query_problems("sum by (kind) (gateway_provider_load)", families) == [
        "grouping by unknown labels ['kind']"
    ]
    assert query_problems("gateway_requests", families) == ["unknown series gateway_requests"]


def test_dashboard_queries_name_only_existing_families() -> None:
    """Dashboard queries name real series and labels, and every family is charted."""
    families = metric_families()
    expressions = list(dashboard_expressions(json.loads(DASHBOARD.read_text(encoding="utf-8"))))
    assert len(expressions) >= 20
    for expression in expressions:
        assert query_problems(expression, families) == [], expression
    charted = {families[name].name for e in expressions for name in promql_references(e).series}
    assert charted == {family.name for family in families.values()}


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    """Panel ids are unique, each panel has a position, and queries use the provisioned uid."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    (datasource,) = datasources["datasources"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = {panel["title"] for panel in panels}
    assert {"Affinity hit ratio", "Request latency (p50 / p95 / p99)", "Latency bands"} <= titles
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_hit_ratio_counts_every_sticky_kind() -> None:
    """Both hit-ratio panels divide hits by hit + miss + rebound + spill + degraded + preferred."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [panel for panel in dashboard["panels"] if panel["title"] == "Affinity hit ratio"]
    assert {panel["type"] for panel in panels} == {"stat", "timeseries"}
    for panel in panels:
        (target,) = panel["targets"]
        numerator, denominator = target["expr"].split(" / ", 1)
        assert 'kind="hit"' in numerator
        assert 'kind=~"hit|miss|rebound|spill|degraded|preferred"' in denominator


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    """The dashboard provider reads the folder compose mounts the dashboard JSON into."""
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/affinity-gateway.yaml")
    path = provider["providers"][0]["options"]["path"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


def test_alerts_reference_existing_families_and_cover_each() -> None:
    """Each alert is well formed, its expression names real series, and every family has one."""
    families = metric_families()
    rules = alert_rules()
    covered: set[str] = set()
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"]
        assert query_problems(rule["expr"], families) == [], rule["alert"]
        covered.update(families[name].name for name in promql_references(rule["expr"]).series)
    assert len({rule["alert"] for rule in rules}) == len(rules)
    assert covered == {family.name for family in families.values()}


def test_metrics_doc_lists_every_family_and_the_alerts_verbatim() -> None:
    """docs/metrics.md names each family as scraped and shows each alert as in the rule file."""
    doc = METRICS_DOC.read_text(encoding="utf-8")
    for series, family in metric_families().items():
        if not series.endswith(("_sum", "_count")):
            scraped = series.removesuffix("_bucket")
            assert f"`{scraped}`" in doc, family.name
    snippets = [
        rule
        for block in re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL)
        for rule in yaml.safe_load(block)
    ]
    documented = {rule["alert"]: rule["expr"] for rule in snippets}
    assert documented == {rule["alert"]: rule["expr"] for rule in alert_rules()}
    # Requests that name no model are counted under the label value the doc gives.
    assert f'`model="{NO_MODEL_LABEL}"`' in doc


def test_gateway_yaml_passes_check_config_with_its_variables_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway check-config deploy/gateway.yaml` succeeds, warning-free, once secrets are set."""
    for name, value in CONFIG_VARIABLES.items():
        monkeypatch.setenv(name, value)
    assert gateway_main(["check-config", str(DEPLOY / "gateway.yaml")]) == 0
    output = capsys.readouterr()
    assert "OK (3 providers, 2 keys, 0 warning(s))" in output.out
    for value in CONFIG_VARIABLES.values():
        assert value not in output.out + output.err


def test_gateway_yaml_takes_its_secrets_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the variables check-config fails, naming the database URL and both keys."""
    for name in CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert gateway_main(["check-config", str(DEPLOY / "gateway.yaml")]) == 1
    errors = capsys.readouterr().err
    for name in ("DATABASE_URL", "ACME_CI_KEY", "ACME_DEV_KEY"):
        assert f"environment variable {name} is not set" in errors


def test_k8s_configmap_config_passes_check_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The gateway.yaml inside the ConfigMap is a valid config too."""
    for name, value in CONFIG_VARIABLES.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "gateway.yaml"
    config.write_text(k8s_documents()["ConfigMap"]["data"]["gateway.yaml"], encoding="utf-8")
    assert gateway_main(["check-config", str(config)]) == 0
    assert "0 warning(s)" in capsys.readouterr().out


def test_k8s_deployment_probes_config_and_secret_are_wired() -> None:
    """Probes use /readyz and /healthz; the ConfigMap is mounted; its ${VAR}s are Secret keys."""
    documents = k8s_documents()
    pod = documents["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    configmap = documents["ConfigMap"]
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    secret_variables = {
        entry["name"]
        for entry in container["env"]
        if entry["valueFrom"]["secretKeyRef"]["name"] == "affinity-gateway-secrets"
    }
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert config_variables(config) <= secret_variables
    labels = pod["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = documents[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(
        config["server"]["metrics_port"]
    )
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > config["server"]["shutdown_timeout_seconds"] + 5  # + the preStop pause


def test_compose_runs_the_whole_set_up_from_files_that_exist() -> None:
    """Compose has every service; its bind mounts exist; gateways get every ${VAR} they use."""
    services = compose()["services"]
    assert {
        "postgres",
        "sim-a",
        "sim-b",
        "sim-c",
        "gateway-1",
        "gateway-2",
        "nginx",
        "prometheus",
        "grafana",
    } <= services.keys()
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    gateway_yaml = load_yaml(DEPLOY / "gateway.yaml")
    for name in ("gateway-1", "gateway-2"):
        assert config_variables(gateway_yaml) <= services[name]["environment"].keys()
        assert services[name]["command"][0] == "serve"
    for name in ("sim-a", "sim-b", "sim-c"):
        assert services[name]["command"][:1] == ["simulate"]
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    defined = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line}
    assert config_variables(compose()) <= defined


def test_prometheus_scrapes_each_gateway_metrics_port_and_loads_the_alerts() -> None:
    """Prometheus targets are the compose gateways on metrics_port, and the rule file is mounted."""
    prometheus = load_yaml(DEPLOY / "prometheus.yml")
    metrics_port = load_yaml(DEPLOY / "gateway.yaml")["server"]["metrics_port"]
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "gateway"]
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"gateway-1:{metrics_port}", f"gateway-2:{metrics_port}"}
    mounts = compose()["services"]["prometheus"]["volumes"]
    (rule_file,) = prometheus["rule_files"]
    assert f"./prometheus-alerts.yml:{rule_file}:ro" in mounts


def test_nginx_conf_streams_to_both_replicas() -> None:
    """nginx proxies to both gateways over HTTP/1.1 keep-alive, unbuffered, with long reads."""
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    port = load_yaml(DEPLOY / "gateway.yaml")["server"]["port"]
    upstream = re.search(r"upstream gateways \{(.*?)\}", conf, flags=re.DOTALL)
    assert upstream is not None
    servers = set(re.findall(r"^\s*server\s+([^\s;]+)", upstream.group(1), flags=re.MULTILINE))
    assert servers == {f"gateway-1:{port}", f"gateway-2:{port}"}
    assert re.search(r"^\s*keepalive \d+;", upstream.group(1), flags=re.MULTILINE)
    for directive in (
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering off;",
        "proxy_read_timeout 600s;",
    ):
        assert directive in conf


def test_nginx_conf_passes_nginx_syntax_check(tmp_path: Path) -> None:
    """`nginx -t` accepts the config (upstream hosts swapped for loopback, which resolves here)."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.fail(NGINX_INSTALL_HINT)
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    local = re.sub(r"\bgateway-(\d+):(\d+)", r"127.0.0.\1:\2", conf)
    copy = tmp_path / "nginx.conf"
    copy.write_text(local, encoding="utf-8")
    result = subprocess.run(
        [nginx, "-t", "-c", str(copy), "-p", f"{tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_dockerfile_installs_the_project_with_the_constraints() -> None:
    """The image: python:3.11-slim, the project pip-installed with constraints.txt, `gateway`."""
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, flags=re.MULTILINE)
    assert "pip install -c constraints.txt ." in dockerfile
    for source in re.findall(r"^COPY (.+) \./?\S*$", dockerfile, flags=re.MULTILINE):
        for name in source.split():
            assert (PROJECT_ROOT / name).exists(), name
    assert 'ENTRYPOINT ["gateway"]' in dockerfile


K8S_VERSION = "1.37.0"


def k8s_manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes resource under deploy/k8s (the kustomization is not one), by file."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found.extend(
            (path.name, document)
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        )
    return found


def test_k8s_manifests_pass_kubernetes_validate_strictly() -> None:
    """kubernetes-validate (its bundled schemas, offline) accepts every manifest, strictly."""
    import kubernetes_validate

    manifests = k8s_manifests()
    assert {document["kind"] for _, document in manifests} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Secret",
    }
    for name, document in manifests:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)  # raises when invalid
        assert name


def test_kubernetes_validate_rejects_a_broken_manifest() -> None:
    """The validator is not a no-op: a typo'd field and a wrong type are both rejected."""
    import kubernetes_validate

    deployment = k8s_documents()["Deployment"]
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    """`kubectl apply -k` takes every manifest file except the Secret example."""
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    files = {path.name for path in (DEPLOY / "k8s").glob("*.yaml")}
    assert set(kustomization["resources"]) == files - {"kustomization.yaml", "secret.example.yaml"}


def test_k8s_prestop_matches_the_drain_delay_and_the_grace_period_covers_shutdown() -> None:
    """preStop sleeps `drain_delay_seconds`; the grace period covers preStop, the lame duck and
    the in-flight drain; probes, resources and a non-root read-only container everywhere."""
    from gateway.operations.serve import SETTLE_TIMEOUT_SECONDS

    documents = k8s_documents()
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    server = yaml.safe_load(documents["ConfigMap"]["data"]["gateway.yaml"])["server"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert float(command[1]) == server["drain_delay_seconds"]
    needed = (
        float(command[1])
        + server["drain_delay_seconds"]
        + SETTLE_TIMEOUT_SECONDS
        + server["shutdown_timeout_seconds"]
    )
    assert pod["terminationGracePeriodSeconds"] > needed
    assert pod["securityContext"]["runAsNonRoot"] is True
    for each in [*pod["initContainers"], *pod["containers"]]:
        assert each["securityContext"]["readOnlyRootFilesystem"] is True, each["name"]
        assert each["securityContext"]["allowPrivilegeEscalation"] is False, each["name"]
        assert {"cpu", "memory"} <= each["resources"]["requests"].keys(), each["name"]
        assert {"cpu", "memory"} <= each["resources"]["limits"].keys(), each["name"]


def test_k8s_migrations_run_in_an_init_container_before_the_gateway() -> None:
    """An init container runs `gateway migrate` with the same config and database secret."""
    documents = k8s_documents()
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert init["args"][:3] == ["migrate", "--config", "/etc/gateway/gateway.yaml"]
    assert init["image"] == container["image"]
    assert init["env"] == container["env"]
    config = yaml.safe_load(documents["ConfigMap"]["data"]["gateway.yaml"])
    assert config["database"]["apply_migrations_on_start"] is False


def test_k8s_hpa_scales_the_deployment_on_cpu_and_the_secret_example_has_every_variable() -> None:
    """The HPA targets the Deployment on CPU; the Secret example names every ${VAR} used."""
    documents = k8s_documents()
    hpa = documents["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == documents["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["minReplicas"] >= 2
    secret = documents["Secret"]
    assert secret["metadata"]["name"] == "affinity-gateway-secrets"
    config = yaml.safe_load(documents["ConfigMap"]["data"]["gateway.yaml"])
    assert config_variables(config) <= secret["stringData"].keys()


def check_jsonschema() -> str:
    """The check-jsonschema executable of this environment."""
    found = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert found is not None, "check-jsonschema is a dev dependency: run scripts/setup"
    return found


def test_compose_file_passes_the_compose_spec_schema(tmp_path: Path) -> None:
    """check-jsonschema's vendored compose-spec schema (offline) accepts the compose file, and
    rejects a copy with a wrong field."""
    command = [check_jsonschema(), "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [*command, str(DEPLOY / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"]["gateway-1"]["stop_grace_perod"] = "40s"
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(yaml.safe_dump(broken), encoding="utf-8")
    rejected = subprocess.run(
        [*command, str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert rejected.returncode == 1, rejected.stdout
    assert "stop_grace_perod" in rejected.stdout


def test_stop_timings_agree_across_compose_nginx_and_the_gateway_config() -> None:
    """nginx drops idle upstream connections before the drain delay ends; compose waits for the
    lame duck and the in-flight drain before it kills a gateway."""
    server = load_yaml(DEPLOY / "gateway.yaml")["server"]
    conf = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    upstream = re.search(r"upstream gateways \{(.*?)\}", conf, flags=re.DOTALL)
    assert upstream is not None
    idle = re.search(r"keepalive_timeout (\d+)s;", upstream.group(1))
    assert idle is not None
    assert int(idle.group(1)) < server["drain_delay_seconds"]
    grace = compose()["services"]["gateway-1"]["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace[:-1]) > server["drain_delay_seconds"] + server["shutdown_timeout_seconds"]

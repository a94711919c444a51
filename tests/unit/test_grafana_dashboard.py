"""deploy/grafana/: every dashboard query names a series the router's GET /metrics exports,
and the dashboard JSON has what Grafana's import checks; deploy/prometheus/ agrees with it.

The exported names come from the real code: a RouterMetrics registry with the per-worker
FleetCollector in it and one finished request, rendered to Prometheus text and parsed back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "splitserve.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

MODEL = "smollm2-135m"
WORKERS = [
    {"name": name, "role": role, "state": state, "running": 1, "waiting": 0,
     "kv_blocks_used": 3, "kv_blocks_total": 10, "preemptions": 0,
     "prefix_hit_tokens": 4, "prefix_query_tokens": 8}
    for name, role, state in [("prefill-0", "prefill", "active"),
                              ("decode-0", "decode", "active"),
                              ("decode-1", "decode", "draining")]
]  # fmt: skip
# the series one metric family exposes, by its type (the text format drops _created here)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("", "_count", "_sum"), "info": ("_info",)}  # fmt: skip
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap",
               "barchart", "piechart", "state-timeline", "histogram"}  # fmt: skip
VARIABLE_TYPES = {"query", "datasource", "custom", "constant", "interval", "textbox", "adhoc"}


# --- what the router exports -----------------------------------------------------------


@dataclass
class Series:
    sampled: bool = False  # the registry rendered samples of it (else only its family's type)
    labels: set[str] = field(default_factory=set)  # label names seen on samples
    le: set[str] = field(default_factory=set)  # bucket bounds, as the text format spells them


def parse_exposition(text: str) -> dict[str, Series]:
    """Series name -> what its samples carry, for every series the text can put in Prometheus
    (families with no sample yet, such as a labelled histogram never observed, included)."""
    series: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, Series())
        for sample in family.samples:
            s = series.setdefault(sample.name, Series())
            s.sampled = True
            s.labels |= set(sample.labels) - {"le"}
            if "le" in sample.labels:
                s.le.add(sample.labels["le"])
    return series


@pytest.fixture(scope="module")
def exported() -> dict[str, Series]:
    from router.fleet_metrics import FleetCollector
    from router.metrics import RouterMetrics

    m = RouterMetrics(MODEL)
    m.registry.register(FleetCollector(MODEL, lambda: WORKERS))
    tracker = m.track("/v1/completions")
    tracker.on_tokens(1)
    tracker.on_tokens(1)
    tracker.finish("200", 5, 2, "length")
    return parse_exposition(m.render().decode())


# --- reading PromQL ----------------------------------------------------------------------

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_NUMBER = re.compile(r"(?<![\w:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}  # fmt: skip


@dataclass
class Selector:
    name: str
    matchers: dict[str, tuple[str, str]]  # label -> (op, value)


@dataclass
class Query:
    selectors: list[Selector]
    grouping: set[str]  # labels named in by / without / on / ignoring / group_*


def parse_promql(expr: str) -> Query:
    """The metric selectors and grouping labels of one PromQL expression (as much of PromQL
    as a dashboard uses; promtool, where installed, checks the full syntax below)."""
    grouping = {g.strip() for m in _GROUPING.finditer(expr) for g in m.group(1).split(",")}
    rest = _GROUPING.sub(" ", expr)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges, subqueries
    selectors = []

    def braced(m: re.Match) -> str:
        body = m.group(2)
        found = list(_MATCHER.finditer(body))
        assert "".join(f.group(0) for f in found).strip() == body.strip(), f"bad {{{body}}}"
        matchers = {f.group(1): (f.group(2), f.group(3)) for f in found}
        name = m.group(1) or matchers.pop("__name__", ("=", ""))[1]
        assert name, f"a selector with no metric name in {expr!r}"
        selectors.append(Selector(name, matchers))
        return " "

    rest = _SELECTOR.sub(braced, rest)
    rest = _NUMBER.sub(" ", re.sub(r"\$\{?\w+\}?", " ", rest))
    for m in re.finditer(r"([A-Za-z_:][\w:]*)(\s*\()?", rest):
        if not m.group(2) and m.group(1) not in _KEYWORDS:  # a call is a function
            selectors.append(Selector(m.group(1), {}))
    return Query(selectors, grouping - {""})


def test_the_query_reader_finds_every_metric_and_label():
    q = parse_promql(
        'histogram_quantile(0.99, sum by (le, engine) (rate(vllm:x_bucket{model_name=~"$m",'
        ' le="1.0"}[$__rate_interval]))) / on() group_left sum(up) + 1e3 * {__name__="y:z"}'
    )
    assert [s.name for s in q.selectors] == ["vllm:x_bucket", "y:z", "up"]
    assert q.selectors[0].matchers == {"model_name": ("=~", "$m"), "le": ("=", "1.0")}
    assert q.grouping == {"le", "engine"}


# --- the dashboard's queries against the exported series --------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every target of every panel."""
    return [
        (f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_every_query_names_only_exported_series(dashboard, exported):
    missing = {
        f"{where}: {s.name}"
        for where, expr in queries(dashboard)
        for s in parse_promql(expr).selectors
        if s.name not in exported
    }
    assert not missing, f"not exported by the router: {sorted(missing)}"


def test_every_query_reads_a_metric(dashboard):
    for where, expr in queries(dashboard):
        assert parse_promql(expr).selectors, where


def test_labels_in_queries_are_labels_the_series_carry(dashboard, exported):
    for where, expr in queries(dashboard):
        q = parse_promql(expr)
        read = [exported.get(s.name, Series()) for s in q.selectors]
        for s, series in zip(q.selectors, read, strict=True):
            if series.sampled:
                assert set(s.matchers) - {"le"} <= series.labels, f"{where}: {s.name}"
                if "model_name" in series.labels:  # the dashboard's model selector applies
                    assert s.matchers.get("model_name") == ("=~", "$model_name"), where
        if read and all(series.sampled for series in read):
            assert q.grouping - {"le"} <= set().union(*(x.labels for x in read)), where


def test_quantiles_and_slo_buckets_read_real_bucket_bounds(dashboard, exported):
    for where, expr in queries(dashboard):
        q = parse_promql(expr)
        if "histogram_quantile(" in expr:
            assert all(s.name.endswith("_bucket") for s in q.selectors), where
            assert "le" in q.grouping, f"{where}: quantiles need the buckets kept apart by le"
        for s in q.selectors:
            if "le" in s.matchers:
                op, bound = s.matchers["le"]
                le = exported[s.name].le
                assert op == "=" and bound in le, f"{where}: le={bound!r} not among {le}"


def test_slo_panel_counts_ttft_within_1s_and_tpot_within_100ms(dashboard):
    (slo,) = [p for p in dashboard["panels"] if p["title"].startswith("SLO attainment")]
    bounds = {
        (s.name, s.matchers["le"][1])
        for t in slo["targets"]
        for s in parse_promql(t["expr"]).selectors
        if "le" in s.matchers
    }
    assert bounds == {
        ("vllm:time_to_first_token_seconds_bucket", "1.0"),
        ("vllm:request_time_per_output_token_seconds_bucket", "0.1"),
    }
    assert slo["fieldConfig"]["defaults"]["unit"] == "percentunit"


# --- what Grafana's import needs ---------------------------------------------------------


def test_dashboard_top_level_fields(dashboard):
    assert isinstance(dashboard["title"], str) and dashboard["title"].strip()
    # Grafana refuses a uid with other characters or over 40 of them
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard.get("id") is None  # an id names a saved dashboard: import would update it
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["annotations"]["list"], list)
    assert {"from", "to"} <= dashboard["time"].keys()
    refresh = re.fullmatch(r"(\d+)([smhd])", dashboard["refresh"])
    seconds = int(refresh.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[refresh.group(2)]
    assert seconds >= 5  # Grafana's default min_refresh_interval


def test_panels_have_unique_ids_known_types_and_fit_the_grid(dashboard):
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert isinstance(p["title"], str) and p["title"].strip()
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy"), p["title"]
        assert g["h"] >= 1 and g["w"] >= 1 and g["x"] >= 0 and g["y"] >= 0
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_data_panel_queries_the_dashboards_prometheus(dashboard):
    for p in dashboard["panels"]:
        if p["type"] == "row":
            assert not p.get("targets") and p["gridPos"]["w"] == 24
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert isinstance(t["expr"], str) and t["expr"].strip(), p["title"]
            assert t.get("datasource", p["datasource"]) == p["datasource"]


def test_templating_defines_the_datasource_and_model_variables(dashboard):
    variables = dashboard["templating"]["list"]
    by_name = {v["name"]: v for v in variables}
    assert len(by_name) == len(variables)
    for v in variables:
        assert v["type"] in VARIABLE_TYPES and re.fullmatch(r"\w+", v["name"])
    assert by_name["datasource"]["type"] == "datasource"
    assert by_name["datasource"]["query"] == "prometheus"
    model = by_name["model_name"]
    assert model["type"] == "query"
    assert model["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    query = model["query"] if isinstance(model["query"], str) else model["query"]["query"]
    assert query == "label_values(vllm:num_requests_running, model_name)"
    assert model.get("includeAll") is False or model.get("allValue") == ".*"  # "All" matches


def test_every_variable_a_query_uses_is_defined(dashboard):
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    text = json.dumps(dashboard["panels"])
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert used <= defined, used - defined


def test_the_readme_explains_every_panel(dashboard):
    readme = (GRAFANA / "README.md").read_text()
    for p in dashboard["panels"]:
        assert p["title"] in readme, p["title"]


# --- the full syntax, with Prometheus' own tool (where the Debian package is installed) ---

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


@needs_promtool
def test_promtool_parses_every_query(dashboard, tmp_path):
    values = {"$__rate_interval": "1m", "$model_name": ".*"}
    rules = []
    for i, (_, expr) in enumerate(queries(dashboard)):
        for var, value in values.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_the_scrape_config():
    done = subprocess.run(
        [PROMTOOL, "check", "config", "--syntax-only", str(PROMETHEUS_YML)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# --- Grafana reads the Prometheus deploy/prometheus/ sets up ----------------------------
# (its scrape jobs are checked in tests/unit/test_deploy_files.py)


def test_provisioning_loads_the_dashboard_from_prometheus_at_the_scrape_interval():
    prov = GRAFANA / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # $__rate_interval follows it
    (provider,) = yaml.safe_load((prov / "dashboards" / "splitserve.yml").read_text())["providers"]
    assert provider["type"] == "file"
    # the README's commands put deploy/grafana (so splitserve.json) at the provider's path
    assert f"deploy/grafana:{provider['options']['path']}" in (GRAFANA / "README.md").read_text()

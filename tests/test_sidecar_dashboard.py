"""The Grafana dashboard is a valid Grafana 10+ dashboard and every series it plots is one the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from adaspec.core.metrics import LogMetrics
from adaspec.core.metrics import EngineMetrics
from adaspec.core.metrics import WeightMetrics
from adaspec.sidecar.metrics import SidecarMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "adaspec-dashboard.json"
METRIC = re.compile(r"\b(adaspec_[a-z0-9_]+)\b")


def exported_series() -> dict[str, set[str]]:
    """Every sample name the metric classes expose (counters as _total, histograms as _bucket/_sum/_count),
    with the label names each one carries."""
    registry = CollectorRegistry()
    metric_sets = [cls(registry) for cls in (EngineMetrics, LogMetrics, WeightMetrics, SidecarMetrics)]
    out: dict[str, set[str]] = {}
    for obj in metric_sets:
        for metric in vars(obj).values():
            labels = set(getattr(metric, "_labelnames", ()))
            name = metric._name
            kind = metric._type
            names = {"counter": [name + "_total"], "gauge": [name],
                     "histogram": [name + "_bucket", name + "_sum", name + "_count"]}[kind]
            for n in names:
                out[n] = labels | ({"le"} if n.endswith("_bucket") else set())
    return out


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_is_grafana_10_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]  # 36 = Grafana 9.0; 39 = 10.x
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] < 24 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] != "row":
            assert p["type"] in ("timeseries", "stat", "heatmap", "gauge", "table") and p["targets"]
            assert all(t["datasource"]["type"] == "prometheus" and t["refId"] for t in p["targets"])


def test_every_plotted_metric_and_label_exists_in_the_code():
    series = exported_series()
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for p in panels(dash):
        for t in p.get("targets", []):
            names = METRIC.findall(t["expr"])
            assert names, f"panel {p['title']!r}: no adaspec metric in {t['expr']!r}"
            for name in names:
                assert name in series, f"panel {p['title']!r} plots {name}, which the code does not export"
                used.add(name)
            for labels in re.findall(r"by \(([^)]*)\)", t["expr"]):
                for label in (x.strip() for x in labels.split(",")):
                    assert any(label in series[n] for n in names), f"{p['title']!r}: no metric has label {label}"
            for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
                assert label == "instance" or any(label in series[n] for n in names), (p["title"], label)
    # the list: per-drafter tau/acceptance, controller choices, lookahead, log drops, trainer loss and
    # throughput, gate decisions, weight version, swap pause -- each is on the dashboard
    for must in ("adaspec_engine_accepted_tokens_total", "adaspec_engine_emitted_tokens_total",
                 "adaspec_engine_forwards_total", "adaspec_engine_lookahead_bucket", "adaspec_log_entries_dropped_total",
                 "adaspec_sidecar_trainer_loss", "adaspec_sidecar_trainer_tokens_per_second",
                 "adaspec_sidecar_gate_decisions_total", "adaspec_sidecar_published_version",
                 "adaspec_drafter_weights_version", "adaspec_engine_swap_pause_seconds_bucket",
                 "adaspec_sidecar_rollbacks_total", "adaspec_sidecar_buffer_fill_ratio"):
        assert must in used, must

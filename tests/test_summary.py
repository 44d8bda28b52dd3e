"""The result at the end of a run: the report's verdict, and links whose run ids exist in the store."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cocomix_core.plumbing import tracking
from cocomix_core.reporting import end_of_run as summary
from cocomix_core.reporting.report import BranchCurve, EvalPoint, write_report

# Two branches, three checkpoints each; ntp ends at val ppl 30 after 3,000 tokens.
CURVES = [
    BranchCurve("ntp", "ntp", [EvalPoint(10, 1000, {"eval/val_ppl": 50.0, "eval/cocomix_choice/acc": 0.25}),
                               EvalPoint(20, 2000, {"eval/val_ppl": 40.0, "eval/cocomix_choice/acc": 0.25}),
                               EvalPoint(30, 3000, {"eval/val_ppl": 30.0, "eval/cocomix_choice/acc": 0.5})], seed=0),
    BranchCurve("cocomix", "cocomix", [EvalPoint(10, 1000, {"eval/val_ppl": 45.0, "eval/cocomix_choice/acc": 0.25}),
                                       EvalPoint(20, 2000, {"eval/val_ppl": 35.0, "eval/cocomix_choice/acc": 0.5}),
                                       EvalPoint(30, 3000, {"eval/val_ppl": 27.0, "eval/cocomix_choice/acc": 0.375})],
                seed=0, lam_concept=0.1),
]


@pytest.fixture()
def report(tmp_path: Path) -> dict:
    return json.loads(write_report(CURVES, tmp_path).json_path.read_text())


def links_for(tracking_uri: str, tmp_path: Path) -> summary.RunLinks:
    """An experiment with a parent run and one run per branch, as the flow's start step makes them."""
    experiment = tracking.ensure_experiment("summary", tracking_uri=tracking_uri)
    parent = tracking.create_run(experiment, "CocomixFlow/7", tracking_uri=tracking_uri)
    branches = {curve.name: tracking.create_run(experiment, f"train/{curve.name}",
                                                tags={tracking.EXPERIMENT_RUN_TAG: parent}, tracking_uri=tracking_uri)
                for curve in CURVES}
    return summary.RunLinks(tracking_uri, experiment, parent, branches, "flows/cocomix_flow.py", "7/report")


def test_end_text_carries_the_reports_verdict_before_the_next_commands(report, tmp_path):
    (verdict,) = report["verdict"]  # one arm against NTP
    # cocomix's final val ppl 27 against ntp's 30; one seed each and no interval logged, so no claim is made
    assert verdict.startswith("cocomix vs ntp: val_ppl 27 ") and " vs 30 " in verdict and "no claim" in verdict
    text = summary.result_text(report, links_for(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path))
    assert f"\n  {verdict}\n" in text
    assert text.index("Verdict") < text.index(verdict) < text.index("Look further:")


def test_branch_table_lines_up_its_columns(report):
    header, *rows = summary.branch_table(report["table"])
    assert header.split() == ["branch", "kind", "seed", "λ", "tokens", "final", "val", "ppl", "best", "val", "ppl"]
    assert rows[0].split() == ["ntp", "ntp", "0", "–", "3,000", "30", "30"]
    assert rows[1].split() == ["cocomix", "cocomix", "0", "0.1", "3,000", "27", "27"]
    assert all(row.index(cell) == header.index("tokens") for row, cell in zip(rows, ["3,000", "3,000"]))


def test_end_text_links_runs_that_exist_in_a_sqlite_store(report, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    links = links_for(store, tmp_path)
    text = summary.result_text(report, links)
    assert f"  mlflow ui --backend-store-uri {store} --port 5000\n" in text
    assert "  python flows/cocomix_flow.py card view 7/report --id report   (the report card)\n" in text
    chart = re.search(r"(http://127\.0\.0\.1:5000/#/experiments/\w+/runs\?\S+)", text).group(1)
    runs = _listed_runs(chart, store, links.experiment_id)
    assert sorted(run.info.run_name for run in runs) == ["train/cocomix", "train/ntp"]
    assert f"  checkpoints: http://127.0.0.1:5000/#/experiments/{links.experiment_id}/models?workflowType=machine_learning" in text
    parent = re.search(r"#/experiments/(\w+)/runs/(\w+)", text)
    assert MlflowClient(store).get_run(parent.group(2)).info.run_name == "CocomixFlow/7" and parent.group(1) == links.experiment_id


@pytest.mark.slow  # needs the session's mlflow server
def test_end_text_points_at_the_tracking_server_it_used(report, tmp_path, mlflow_server):
    links = links_for(mlflow_server.url, tmp_path)
    text = summary.result_text(report, links)
    assert "mlflow ui" not in text  # the server serves its own UI
    chart = re.search(r"(http://\S+/#/experiments/\w+/runs\?\S+)", text).group(1)
    assert chart.startswith(f"{mlflow_server.url}/#/experiments/{links.experiment_id}/runs?")
    runs = _listed_runs(chart, mlflow_server.url, links.experiment_id)  # the server the link points at lists them
    assert sorted(run.info.run_name for run in runs) == ["train/cocomix", "train/ntp"]
    with urllib.request.urlopen(chart.split("#")[0]) as response:  # the UI page itself
        assert response.status == 200 and b"<html" in response.read().lower()


def _listed_runs(chart_url: str, store: str, experiment_id: str) -> list:
    """The runs the chart link's view lists: its search filter, run against the store, in the Model-training view."""
    experiment, query = re.search(r"#/experiments/(\w+)/runs\?(\S+)", chart_url).groups()
    query = urllib.parse.parse_qs(query)
    assert experiment == experiment_id
    assert query["workflowType"] == ["machine_learning"] and query["compareRunsMode"] == ["CHART"]
    return MlflowClient(store).search_runs([experiment], query["searchFilter"][0])


def test_description_holds_settings_and_verdict_within_mlflow_limits(report, tmp_path):
    from settings import load_settings

    text = summary.description_markdown(report, summary.settings_summary(load_settings("smoke")))
    assert text.startswith("**Settings**: preset smoke; 12 steps × 4 × 32 tokens = 1,536 tokens per branch; "
                           "branches ntp, cocomix;")
    assert f"- {report['verdict'][0]}" in text  # the same verdict as the console and the card
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    links = links_for(store, tmp_path)
    tracking.set_description(links.parent_run_id, text, tracking_uri=store)
    assert MlflowClient(store).get_run(links.parent_run_id).data.tags[tracking.NOTE_TAG] == text


def test_a_degenerate_run_points_to_cpu_study_everywhere(tmp_path):
    # unigram floor 30: 0.8 × 30 = 24, and both arms (27 and 30) are above it
    content = json.loads(write_report(CURVES, tmp_path, unigram_ppl=30.0).json_path.read_text())
    assert content["verdicts"][0]["claim"] == "degenerate" and content["unigram_ppl"] == 30.0
    links = links_for(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    text = summary.result_text(content, links)
    description = summary.description_markdown(content, "preset cpu")
    for shown in (text, description, (tmp_path / "report.md").read_text()):
        assert "degenerate: both arms near the unigram level" in shown
        assert "--settings cpu_study" in shown and "Unigram floor: validation perplexity 30" in shown

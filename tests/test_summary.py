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
    branches = {curve.name: tracking.create_run(experiment, f"train/{curve.name}", parent_run_id=parent,
                                                tracking_uri=tracking_uri) for curve in CURVES}
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
    compare = re.search(r"(http://127\.0\.0\.1:5000/#/compare-runs\?\S+)", text).group(1)
    query = urllib.parse.parse_qs(compare.split("?", 1)[1])
    run_ids, experiments = json.loads(query["runs"][0]), json.loads(query["experiments"][0])
    client = MlflowClient(store)
    assert experiments == [links.experiment_id]
    assert sorted(client.get_run(run_id).info.run_name for run_id in run_ids) == ["train/cocomix", "train/ntp"]
    assert all(client.get_run(run_id).info.experiment_id == links.experiment_id for run_id in run_ids)
    parent = re.search(r"#/experiments/(\w+)/runs/(\w+)", text)
    assert client.get_run(parent.group(2)).info.run_name == "CocomixFlow/7" and parent.group(1) == links.experiment_id


@pytest.mark.slow  # needs the session's mlflow server
def test_end_text_points_at_the_tracking_server_it_used(report, tmp_path, mlflow_server):
    links = links_for(mlflow_server.url, tmp_path)
    text = summary.result_text(report, links)
    assert "mlflow ui" not in text  # the server serves its own UI
    compare = re.search(r"(http://\S+/#/compare-runs\?\S+)", text).group(1)
    assert compare.startswith(f"{mlflow_server.url}/#/compare-runs?")
    run_ids = json.loads(urllib.parse.parse_qs(compare.split("?", 1)[1])["runs"][0])
    for run_id in run_ids:  # the server the link points at knows each run
        with urllib.request.urlopen(f"{mlflow_server.url}/api/2.0/mlflow/runs/get?run_id={run_id}") as response:
            assert json.load(response)["run"]["info"]["experiment_id"] == links.experiment_id
    with urllib.request.urlopen(compare.split("#")[0]) as response:  # the UI page itself
        assert response.status == 200 and b"<html" in response.read().lower()


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

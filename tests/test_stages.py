"""The flow's stages without Metaflow: the whole smoke experiment in-process, against a real MLflow store.

prepare -> teacher -> SAE -> labels -> an NTP and a CoCoMix branch -> one checkpoint each evaluated
-> report, with every product in a local storage root and every metric in a SQLite MLflow store.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cocomix_core import stages
from cocomix_core.concepts import stage as concepts_stage
from cocomix_core.data import stage as data_stage
from cocomix_core.data.corpus import training_windows
from cocomix_core.plumbing import tracking
from cocomix_core.plumbing.storage import Storage
from cocomix_core.reporting import card
from cocomix_core.training import stage as training_stage
from settings import Branch, ExperimentSettings, load_settings, training_branches

STEPS, BATCH, BLOCK = 4, 4, 32  # the smoke preset's batch and block, trained for 4 steps
OVERRIDES = [
    f"train.steps={STEPS}", "train.checkpoint_every=4", "train.eval_every=4",
    "teacher.train.steps=4", "teacher.train.checkpoint_every=4", "teacher.train.eval_every=4",
    "sae.steps=6", "eval.tasks=[]",  # perplexity is what these tests read; lm-eval runs in test_evaluate
]


@dataclass
class Experiment:
    settings: ExperimentSettings
    storage: Storage
    client: MlflowClient
    experiment_id: str
    tracking_uri: str
    data: stages.PreparedData
    data_again: stages.PreparedData
    teacher: stages.Teacher
    sae: stages.SAE
    labels: stages.Labels
    teacher_logits: stages.TeacherLogits
    run_ids: dict[str, str]  # MLflow run per piece of work
    checkpoints: dict[str, list[stages.Checkpoint]]  # per branch
    first_notes: dict[str, str]  # per branch: what its first training said it did
    trained_again: stages.TrainedBranch  # the NTP branch trained a second time into the same folder
    metrics: dict[str, dict[str, float]]  # per branch: its one checkpoint's evaluation
    report: object
    report_dir: Path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    root = tmp_path_factory.mktemp("stages")
    settings = load_settings("smoke", OVERRIDES)
    storage = Storage(str(root / "artifacts"))
    uri = f"sqlite:///{root / 'mlruns.db'}"
    experiment_id = tracking.ensure_experiment("stages", uri)
    parent = tracking.create_run(experiment_id, "parent", tracking_uri=uri)
    run_ids = {"parent": parent}

    def child(name: str):
        return tracking.tracked_run(experiment_id, name, parent_run_id=parent, tags={}, tracking_uri=uri)

    with child("prepare") as tracker:
        data = stages.prepare_data(settings, storage, tracker)
        run_ids["prepare"] = tracker.run_id
    with child("prepare-again") as tracker:
        data_again = stages.prepare_data(settings, storage, tracker)
    with child("teacher") as tracker:
        teacher = stages.obtain_teacher(settings, storage, data, tracker)
        run_ids["teacher"] = tracker.run_id
    with child("sae") as tracker:
        sae = stages.fit_sae(settings, storage, data, teacher, tracker)
        run_ids["sae"] = tracker.run_id
    labels = stages.build_labels(settings, storage, data, teacher, sae)
    teacher_logits = stages.build_teacher_logits(settings, storage, data, teacher)

    checkpoints, first_notes, metrics, evaluations = {}, {}, {}, []
    with child("evaluation") as evaluation_tracker:
        for branch in training_branches(settings):
            with child(f"train/{branch.name}") as tracker:
                run_ids[branch.name] = tracker.run_id
                trained = stages.train_branch(
                    settings, storage, branch, stages.run_folder_key("local", branch.name), data, teacher, sae,
                    labels, tracker, teacher_logits=teacher_logits,
                )
                checkpoints[branch.name], first_notes[branch.name] = trained.checkpoints, trained.note
                last = checkpoints[branch.name][-1]
                metrics[branch.name], replicates = stages.evaluate_checkpoint_job(
                    settings, storage, data, last, parallel_tasks=1)
                stages.log_evaluation(metrics[branch.name], last, branch.name, tracker, evaluation_tracker)
                evaluations.append((branch, last, metrics[branch.name], replicates))
        run_ids["evaluation"] = evaluation_tracker.run_id
    with child("train/ntp again") as tracker:  # as a resumed flow does after the branch finished
        trained_again = stages.train_branch(settings, storage, branch_named(settings, "ntp"),
                                            stages.run_folder_key("local", "ntp"), data, teacher, sae, labels, tracker,
                                            teacher_logits=teacher_logits)
    report_dir = root / "report"
    with tracking.active_run(parent, uri) as tracker:
        report = stages.write_report(evaluations, report_dir, tracker, data.unigram_ppl)
    return Experiment(settings, storage, MlflowClient(uri), experiment_id, uri, data, data_again, teacher, sae, labels,
                      teacher_logits, run_ids, checkpoints, first_notes, trained_again, metrics, report, report_dir)


def branch_named(settings: ExperimentSettings, name: str) -> Branch:
    (branch,) = [branch for branch in training_branches(settings) if branch.name == name]
    return branch


def test_prepared_data_counts_the_tokens_in_its_shards_and_is_reused_by_a_second_call(experiment: Experiment):
    folder = experiment.data.folder(experiment.storage)
    for split in ("train", "val"):
        tokens = (folder / f"{split}.bin").stat().st_size // 2  # uint16 token ids
        assert experiment.data.splits[split]["tokens"] == tokens > 0
    assert (folder / data_stage.TASKS_DIR / "cocomix_choice.yaml").is_file()
    assert "prepared" in experiment.data.note and "reused" not in experiment.data.note
    assert experiment.data_again.note.startswith(f"data already prepared at {experiment.data.uri}")
    assert experiment.data_again.digest == experiment.data.digest
    run = experiment.client.get_run(experiment.run_ids["prepare"])
    assert run.data.metrics["data/train_tokens"] == experiment.data.splits["train"]["tokens"]
    # the unigram floor: an untrained model over the prepared vocabulary, so between 1 and the vocabulary size
    assert run.data.metrics["data/unigram_val_ppl"] == experiment.data.unigram_ppl
    assert 1 < experiment.data.unigram_ppl < 50257 and f"{experiment.data.unigram_ppl:.4g}" in experiment.data.note
    assert [item.dataset.digest for item in run.inputs.dataset_inputs] == [experiment.data.digest[:36]]


def test_the_teacher_and_sae_are_trained_into_storage_and_their_health_is_tracked(experiment: Experiment):
    from cocomix_core.training.checkpoints import checkpoint_info

    teacher_checkpoint = Path(experiment.teacher.local(experiment.storage))
    assert checkpoint_info(teacher_checkpoint)["step"] == 4
    assert experiment.teacher.ref == experiment.storage.uri(experiment.teacher.key)
    assert Path(experiment.sae.local(experiment.storage)).is_file()
    sae_run = experiment.client.get_run(experiment.run_ids["sae"])
    for name in concepts_stage.SAE_HEALTH:
        assert sae_run.data.metrics[f"sae/{name}"] == pytest.approx(experiment.sae.metrics[name])
    assert 0 <= experiment.sae.metrics["dead_fraction"] <= 1
    assert experiment.client.get_metric_history(experiment.run_ids["teacher"], "train/loss")


def test_labels_cover_every_training_sample_the_branches_read(experiment: Experiment):
    from cocomix_core.concepts.labels import LABELS_FILE

    assert list(experiment.labels.keys) == ["attribution"]  # the smoke CoCoMix arm's selection, nothing else
    folder = experiment.storage.materialize(experiment.labels.keys["attribution"])
    k = experiment.settings.concepts.labels_per_token
    labels = np.fromfile(folder / LABELS_FILE, dtype=np.uint16)
    assert labels.size == STEPS * BATCH * BLOCK * k
    assert labels.max() < experiment.settings.sae.num_latents


def test_each_branch_trains_to_its_checkpoint_and_its_evaluation_is_in_mlflow(experiment: Experiment):
    assert set(experiment.checkpoints) == {"ntp", "cocomix"}
    for name, checkpoints in experiment.checkpoints.items():
        assert [(c.name, c.step, c.tokens_seen) for c in checkpoints] == [("step_000004", 4, STEPS * BATCH * BLOCK)]
        assert Path(checkpoints[0].uri, "config.json").is_file()
        val_ppl = experiment.metrics[name]["eval/val_ppl"]
        assert 1 < val_ppl < 50257 * 2 and math.isfinite(val_ppl)  # an untrained GPT-2 vocabulary model: ~vocab size
        history = experiment.client.get_metric_history(experiment.run_ids[name], "eval/val_ppl")
        assert [(point.step, point.value) for point in history] == [(4, pytest.approx(val_ppl))]
        grouped = experiment.client.get_metric_history(experiment.run_ids["evaluation"], f"{name}/eval/val_ppl")
        assert [point.step for point in grouped] == [4]
        listed = json.loads(Path(experiment.client.download_artifacts(experiment.run_ids[name], "checkpoints.json"))
                            .read_text())
        assert [entry["step"] for entry in listed] == [4]
        params = experiment.client.get_run(experiment.run_ids[name]).data.params
        assert params["branch.name"] == name and params["train.steps"] == str(STEPS)


def test_training_a_finished_branch_again_does_nothing_and_says_so(experiment: Experiment):
    assert experiment.trained_again.checkpoints == experiment.checkpoints["ntp"]
    assert experiment.trained_again.note.startswith("ntp: already trained to step 4, nothing to do")
    assert experiment.first_notes["ntp"].startswith("ntp: trained to step 4, val ppl")


def test_the_report_compares_both_branches_and_is_logged_on_the_parent(experiment: Experiment):
    content = json.loads((experiment.report_dir / "report.json").read_text())
    rows = {row["branch"]: row for row in content["table"]}
    assert set(rows) == {"ntp", "cocomix"}
    for name, row in rows.items():
        assert row["final_val_ppl"] == pytest.approx(experiment.metrics[name]["eval/val_ppl"])
        assert row["final_tokens"] == STEPS * BATCH * BLOCK
    assert (experiment.report_dir / "report.md").read_text().strip()
    assert list((experiment.report_dir / "plots").glob("*.png"))
    parent = experiment.client.get_run(experiment.run_ids["parent"])
    assert parent.data.metrics["report/ntp/final_val_ppl"] == pytest.approx(experiment.metrics["ntp"]["eval/val_ppl"])
    logged = {item.path for item in experiment.client.list_artifacts(experiment.run_ids["parent"], "report")}
    assert "report/report.json" in logged



def test_one_seed_verdicts_pair_the_evaluators_bootstrap_replicates(experiment: Experiment):
    content = json.loads((experiment.report_dir / "report.json").read_text())
    (row,) = content["verdicts"]
    assert (row["arm"], row["reference"], row["seeds"]) == ("cocomix", "ntp", 1)
    difference = row["difference"]
    # the paired bootstrap over the shared validation windows (the smoke preset evaluates eval.val_windows of them)
    assert difference["method"] == "paired bootstrap" and difference["n"] == experiment.settings.eval.val_windows
    assert difference["value"] == pytest.approx(
        experiment.metrics["cocomix"]["eval/val_ppl"] - experiment.metrics["ntp"]["eval/val_ppl"])
    assert difference["lo"] <= difference["value"] <= difference["hi"]
    assert row["min_detectable_difference"] == pytest.approx(2.801585 * difference["standard_error"], rel=1e-5)
    assert content["unigram_ppl"] == experiment.data.unigram_ppl


KD_TOP_K = 16
KD_ARMS = [  # two KD arms that share a cache (same τ and top-k), one that needs its own, each at two seeds
    f"arms.kd={{kind: kd, model: {{width: 32, depth: 2, heads: 2}}, kd_top_k: {KD_TOP_K}}}",
    f"arms.kd_half={{kind: kd, model: {{width: 32, depth: 2, heads: 2}}, kd_top_k: {KD_TOP_K}, lam_kd: 0.5}}",
    f"arms.kd_hot={{kind: kd, model: {{width: 32, depth: 2, heads: 2}}, kd_top_k: {KD_TOP_K}, kd_temperature: 2.0}}",
    "sweep.seeds=[0, 1]",
]


def test_kd_teacher_logits_are_cached_once_per_temperature_and_top_k_and_shared_by_every_seed(experiment: Experiment):
    import torch

    from cocomix_core.concepts.labels import load_teacher
    from cocomix_core.training.distill import TeacherLogitCache

    assert experiment.teacher_logits == stages.TeacherLogits(keys={}, note="teacher logits: none needed (no KD branch)")
    settings = load_settings("smoke", OVERRIDES + KD_ARMS)
    storage, data, teacher = experiment.storage, experiment.data, experiment.teacher
    built = stages.build_teacher_logits(settings, storage, data, teacher)
    assert set(built.keys) == {"tau1-top16", "tau2-top16"}  # kd and kd_half share one cache
    assert built.note.count("of 16 training samples cached") == 2 and "reused" not in built.note
    files = {name: storage.materialize(key) / "top_log_probs.f32" for name, key in built.keys.items()}
    written = {name: (path.stat().st_ino, path.stat().st_mtime_ns) for name, path in files.items()}

    again = stages.build_teacher_logits(settings, storage, data, teacher)  # as a rerun or resume of the step would
    assert again.keys == built.keys and again.note.count("reused") == 2
    assert {name: (path.stat().st_ino, path.stat().st_mtime_ns) for name, path in files.items()} == written

    # Every seed of an arm, and both arms with τ=1, hand the trainer the one cache of their (τ, top-k).
    branches = {branch.name: branch for branch in training_branches(settings)}
    handed = {name: training_stage._teacher_input_args(settings, storage, branch, teacher, experiment.sae, experiment.labels,
                                               built)
              for name, branch in branches.items() if branch.kind == "kd"}
    shared = ["--teacher-logits", str(storage.materialize(built.keys["tau1-top16"]))]
    assert handed["kd-s0"] == handed["kd-s1"] == handed["kd_half-s0"] == handed["kd_half-s1"] == shared
    assert handed["kd_hot-s0"] == handed["kd_hot-s1"] == ["--teacher-logits", str(files["tau2-top16"].parent)]

    # The cached targets against a float64 softmax of the teacher's logits at τ=2 (sample 0).
    cache = TeacherLogitCache(files["tau2-top16"].parent)
    ids = torch.from_numpy(training_windows(data.folder(storage), settings.data).batch(0, 1))
    with torch.no_grad():
        logits = load_teacher(teacher.local(storage))(input_ids=ids).logits.double()
    log_p = torch.log_softmax(logits / 2.0, dim=-1)
    top_log_p, top_ids = log_p.topk(KD_TOP_K, dim=-1)
    targets = cache.targets(0, ids)
    assert torch.equal(targets.token_ids.long(), top_ids)
    torch.testing.assert_close(targets.log_probs.double(), top_log_p, atol=1e-5, rtol=0)
    tail = 1 - top_log_p.exp().sum(-1)
    torch.testing.assert_close(targets.tail_log_prob.double().exp(), tail, atol=1e-5, rtol=1e-4)

    # Both seeds of `kd` train from it: distinct initialisations, one teacher target.
    kd_losses = {}
    for name in ("kd-s0", "kd-s1"):
        with tracking.tracked_run(experiment.experiment_id, f"train/{name}", parent_run_id=experiment.run_ids["parent"],
                                  tags={}, tracking_uri=experiment.tracking_uri) as tracker:
            trained = stages.train_branch(settings, storage, branches[name], stages.run_folder_key("kd", name), data,
                                          teacher, experiment.sae, experiment.labels, tracker, teacher_logits=built)
        assert trained.note.startswith(f"{name}: trained to step {STEPS}")
        history = experiment.client.get_metric_history(tracker.run_id, "train/kd_loss")
        kd_losses[name] = [point.value for point in history]
    # A KL, so ≥ 0 up to float32 rounding (near 0 here: a 4-step teacher and a fresh student are both near uniform).
    assert all(losses and all(math.isfinite(loss) and loss > -1e-6 for loss in losses) for losses in kd_losses.values())
    assert kd_losses["kd-s0"] != kd_losses["kd-s1"]
    assert {name: (path.stat().st_ino, path.stat().st_mtime_ns) for name, path in files.items()} == written


def test_online_kd_runs_the_teacher_on_each_batch_and_its_exact_loss_bounds_the_cached_one(experiment: Experiment):
    """`concepts.label_source: online` with a KD arm: no cache is built, the trainer gets the teacher itself, and
    its first loss (the exact KL over the whole vocabulary) is at least the top-k cache's (SPEC §9)."""
    storage, data, teacher = experiment.storage, experiment.data, experiment.teacher
    kd_losses = {}
    for source in ("online", "cache"):
        settings = load_settings("smoke", OVERRIDES + [KD_ARMS[0], "train.log_every=1",
                                                       f"concepts.label_source={source}"])
        built = stages.build_teacher_logits(settings, storage, data, teacher)
        branch = branch_named(settings, "kd")
        handed = training_stage._teacher_input_args(settings, storage, branch, teacher, experiment.sae, experiment.labels,
                                            built)
        if source == "online":
            assert built.keys == {} and "computed online" in built.note
            assert handed == ["--teacher", teacher.local(storage)]
        else:
            assert handed[0] == "--teacher-logits"
        with tracking.tracked_run(experiment.experiment_id, f"train/kd-{source}", parent_run_id=None, tags={},
                                  tracking_uri=experiment.tracking_uri) as tracker:
            stages.train_branch(settings, storage, branch, stages.run_folder_key(source, "kd"), data, teacher,
                                experiment.sae, experiment.labels, tracker, teacher_logits=built)
        history = experiment.client.get_metric_history(tracker.run_id, "train/kd_loss")
        kd_losses[source] = [point.value for point in sorted(history, key=lambda point: point.step)]
    assert len(kd_losses["online"]) == len(kd_losses["cache"]) == STEPS
    # Step 1 scores the same initial student on the same batch: the cache drops only the teacher's tail.
    assert kd_losses["online"][0] >= kd_losses["cache"][0] - 1e-6, kd_losses
    assert kd_losses["online"] != kd_losses["cache"]  # the online branch really ran the exact targets


def test_each_label_selection_in_use_gets_its_own_cache(experiment: Experiment):
    from cocomix_core.concepts.labels import LabelCache

    activation = "arms.cocomix_act={kind: cocomix, model: {width: 32, depth: 2, heads: 2}, concept_num: 8, " \
                 "insert_layer_index: 1, label_selection: activation}"
    settings = load_settings("smoke", OVERRIDES + [activation])
    labels = stages.build_labels(settings, experiment.storage, experiment.data, experiment.teacher, experiment.sae)
    assert labels.keys["attribution"] == experiment.labels.keys["attribution"]  # the fixture's cache, reused
    assert "labels (attribution) already cached" in labels.note and "labels (activation) of 16" in labels.note
    caches = {selection: LabelCache(experiment.storage.materialize(key)) for selection, key in labels.keys.items()}
    assert {selection: cache.manifest["provenance"]["label_selection"] for selection, cache in caches.items()} == {
        "attribution": "attribution", "activation": "activation"}
    # Activation-selected labels are the SAE's largest latents: another set than the attribution's top K.
    assert not np.array_equal(caches["activation"].labels(0, 4).numpy(), caches["attribution"].labels(0, 4).numpy())
    for selection in ("attribution", "activation"):
        (branch,) = [b for b in training_branches(settings) if settings.arms[b.arm].label_selection == selection
                     and b.kind == "cocomix"]
        assert training_stage._teacher_input_args(settings, experiment.storage, branch, experiment.teacher, experiment.sae,
                                          labels, experiment.teacher_logits) == [
            "--labels", str(experiment.storage.materialize(labels.keys[selection]))]


def test_the_report_aggregates_seeds_per_arm_and_keeps_swept_lambdas_apart():
    branch = Branch(name="cocomix-s1-lam0.1", arm="cocomix", kind="cocomix", seed=1, lam_concept=0.1)
    assert stages.report_arm(branch) == "cocomix-lam0.1"
    assert stages.report_arm(Branch(name="kd-s1", arm="kd", kind="kd", seed=1, lam_concept=0.1)) == "kd"


def test_wide_tables_are_split_with_the_row_label_repeated():
    header = "| branch | " + " | ".join(f"c{index}" for index in range(7)) + " |"
    markdown = "\n".join(["# Title", "", header, "|" + "---|" * 8, "| ntp | " + " | ".join("1234567") + " |", ""])
    split = card.split_wide_tables(markdown, max_columns=4)
    tables = [block for block in split.split("\n\n") if block.startswith("|")]
    assert [block.splitlines()[0] for block in tables] == [
        "| branch | c0 | c1 | c2 |", "| branch | c3 | c4 | c5 |", "| branch | c6 |"]
    assert [block.splitlines()[2] for block in tables] == ["| ntp | 1 | 2 | 3 |", "| ntp | 4 | 5 | 6 |", "| ntp | 7 |"]
    assert split.startswith("# Title\n")


@pytest.mark.parametrize(("file_name", "caption"), [
    ("cocomix_choice__acc_norm.png", "cocomix_choice: length-normalised accuracy by training tokens"),
    ("val_ppl.png", "Validation perplexity by training tokens"),
])
def test_plot_captions_are_words(file_name: str, caption: str):
    assert card.plot_caption(Path(file_name)) == caption


# ----- a pretrained teacher with its own tokenizer (SPEC §8) ----------------------------------------
def pretrained_settings(teacher: Path, tokenizer: str = "teacher") -> ExperimentSettings:
    """The smoke preset with a pretrained teacher folder, its SAE at a middle block, two training steps."""
    return load_settings("smoke", [
        f"tokenizer.name={tokenizer}", f"teacher.pretrained={teacher}", "sae.layer_index=1", "data.val_fraction=0.1",
        "sae.steps=8", "sae.num_latents=64", "sae.k=8", "sae.aux_k=16", "arms.cocomix.concept_num=8",
        "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.eval_windows=2",
        "eval.tasks=[cocomix_choice]", "eval.limit=4",
    ])


def test_a_pretrained_teacher_with_its_own_tokenizer_runs_every_stage(tmp_path: Path):
    from tiny_teachers import save_teacher
    from transformers import AutoConfig, AutoTokenizer

    from cocomix_core.data.corpus import data_tokenizer
    from cocomix_core.data.tokenizer import TokenizerError, hf_tokenizer

    llama = save_teacher("llama", tmp_path / "llama")
    settings, storage = pretrained_settings(llama), Storage(str(tmp_path / "artifacts"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    experiment_id = tracking.ensure_experiment("pretrained", uri)

    def child(name: str):
        return tracking.tracked_run(experiment_id, name, parent_run_id=None, tags={}, tracking_uri=uri)

    with child("prepare") as tracker:
        data = stages.prepare_data(settings, storage, tracker)
    with child("teacher") as tracker:
        teacher = stages.obtain_teacher(settings, storage, data, tracker)
    with child("sae") as tracker:
        sae = stages.fit_sae(settings, storage, data, teacher, tracker)
    labels = stages.build_labels(settings, storage, data, teacher, sae)
    teacher_logits = stages.build_teacher_logits(settings, storage, data, teacher)  # none: no KD arm

    tokenizer = hf_tokenizer(llama)  # the teacher's own BPE: 800 ids, EOS </s>
    assert data_tokenizer(data.folder(storage)).digest == tokenizer.digest
    assert (teacher.key, teacher.local(storage)) == (None, str(llama))
    assert teacher.identity.startswith(f"{llama}@")  # the folder and a digest of its files
    padded = -(-tokenizer.vocab_size // 64) * 64  # students' rows: the tokenizer's ids padded to a multiple of 64
    text = "The state of the Union is strong."
    for branch in training_branches(settings):
        with child(f"train/{branch.name}") as tracker:
            trained = stages.train_branch(settings, storage, branch, stages.run_folder_key("pretrained", branch.name),
                                          data, teacher, sae, labels, tracker, teacher_logits=teacher_logits)
        (checkpoint,) = trained.checkpoints
        folder = storage.materialize(checkpoint.key)
        config = AutoConfig.from_pretrained(folder)
        assert config.vocab_size == padded == 832
        assert config.eos_token_id == config.bos_token_id == 2  # the data's EOS, not GPT-2's 50256
        stock = AutoTokenizer.from_pretrained(str(folder))  # the checkpoint carries the teacher's tokenizer files
        assert stock(text, add_special_tokens=False)["input_ids"] == tokenizer.encode_ordinary(text)
        assert stock.eos_token_id == tokenizer.eos_id == 2
        metrics, _ = stages.evaluate_checkpoint_job(settings, storage, data, checkpoint, parallel_tasks=1)
        assert 1 < metrics["eval/val_ppl"] < 2 * padded  # an untrained model over 800 ids: about the vocabulary size

    # Another teacher with the same tokenizer: the data is reused, the SAE and the labels are not.
    other = pretrained_settings(save_teacher("llama", tmp_path / "llama_seed1", seed=1))
    with child("prepare other") as tracker:
        other_data = stages.prepare_data(other, storage, tracker)
    with child("teacher other") as tracker:
        other_teacher = stages.obtain_teacher(other, storage, other_data, tracker)
    with child("sae other") as tracker:
        other_sae = stages.fit_sae(other, storage, other_data, other_teacher, tracker)
    other_labels = stages.build_labels(other, storage, other_data, other_teacher, other_sae)
    assert other_data.key == data.key
    assert other_sae.key != sae.key and other_labels.keys["attribution"] != labels.keys["attribution"]
    assert other_sae.metrics != sae.metrics  # fitted afresh on the other teacher's residual stream

    # The first teacher's folder rewritten in place with other weights: new identity, its SAE is fitted afresh.
    save_teacher("llama", llama, seed=1)
    with child("teacher edited") as tracker:
        edited_teacher = stages.obtain_teacher(settings, storage, data, tracker)
    with child("sae edited") as tracker:
        edited_sae = stages.fit_sae(settings, storage, data, edited_teacher, tracker)
    assert edited_teacher.identity != teacher.identity and edited_sae.key != sae.key
    assert edited_sae.metrics == other_sae.metrics  # the same weights as `other`, wherever the folder is

    # A teacher whose tokenizer is not the data's is refused before its SAE is fitted.
    neox = save_teacher("gpt_neox", tmp_path / "neox")
    mismatched = pretrained_settings(neox, tokenizer=str(llama))
    with child("prepare mismatched") as tracker:
        mismatched_data = stages.prepare_data(mismatched, storage, tracker)
    with child("teacher mismatched") as tracker, pytest.raises(TokenizerError, match="teacher's tokenizer .*differs"):
        stages.obtain_teacher(mismatched, storage, mismatched_data, tracker)


@pytest.mark.slow  # de-quantizes the packaged SmolLM2 GGUF (the session's one read): tens of seconds on 2 cores
def test_the_cpu_presets_gguf_teacher_is_converted_once_into_storage_and_tokenizes_the_data(tmp_path, monkeypatch,
                                                                                             capsys, smollm2_gguf):
    from cocomix_core.concepts import teachers
    from cocomix_core.data.corpus import data_tokenizer
    from cocomix_core.data.tokenizer import hf_tokenizer
    from cocomix_core.plumbing.files import sha256_file

    # The cpu preset's teacher and tokenizer on a slice of its corpus: the conversion is what is tested.
    settings = load_settings("cpu", ["data.offline_task_items=4", "data.max_documents=40", "data.min_val_tokens=4000"])
    storage = Storage(str(tmp_path / "artifacts"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    experiment_id = tracking.ensure_experiment("gguf", uri)
    monkeypatch.setattr(teachers, "_load_gguf", lambda path: smollm2_gguf)  # the session's one read of the file
    with tracking.tracked_run(experiment_id, "prepare", parent_run_id=None, tags={}, tracking_uri=uri) as tracker:
        data = stages.prepare_data(settings, storage, tracker)  # converts the GGUF: the data needs its tokenizer
    assert "converting the GGUF teacher SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err  # not silent

    def no_second_conversion(path):
        raise AssertionError(f"{path} converted again")

    monkeypatch.setattr(teachers, "_load_gguf", no_second_conversion)
    with tracking.tracked_run(experiment_id, "teacher", parent_run_id=None, tags={}, tracking_uri=uri) as tracker:
        teacher = stages.obtain_teacher(settings, storage, data, tracker)
    identity = f"gguf-{sha256_file(teachers.packaged_gguf('smollm2-135m'))[:16]}"
    assert (teacher.key, teacher.identity) == (f"teacher/{identity}", identity)
    assert "already converted" in teacher.note and "converting" not in capsys.readouterr().err
    folder = Path(teacher.local(storage))
    assert folder == storage.materialize(teacher.key) and (folder / "model.safetensors").is_file()
    tokenizer = data_tokenizer(data.folder(storage))
    assert tokenizer.vocab_size == 49_152 and tokenizer.digest == hf_tokenizer(folder).digest


def test_the_concepts_come_from_the_label_pass_the_validation_labels_and_the_final_cocomix_checkpoint(
    experiment: Experiment, tmp_path: Path
):
    from cocomix_core.concepts.labels import LABELS_FILE, ConceptFiles
    from cocomix_core.evaluation.concept_quality import FREQUENCY_METRIC, OVERLAP_METRIC

    settings, storage, k = experiment.settings, experiment.storage, experiment.settings.concepts.labels_per_token
    # Evaluation and the report read a folder of the cache's small files, never the training labels.
    cache = ConceptFiles(storage.materialize(experiment.labels.concept_keys["attribution"]))
    assert not (cache.path / LABELS_FILE).exists()
    assert cache.val_labels().shape == (settings.eval.val_windows, BLOCK, k)  # the windows evaluation scores
    cards = cache.cards()  # gathered from the training label pass itself
    assert cards.tokens == STEPS * BATCH * BLOCK and cards.label_counts.sum() == STEPS * BATCH * BLOCK * k
    branches = {branch.name: branch for branch in training_branches(settings)}
    measured = {name: stages.concept_prediction_job(settings, storage, experiment.data, experiment.labels,
                                                    branches[name], experiment.checkpoints[name][-1])
                for name in branches}
    assert measured["ntp"] == {} and 0 <= measured["cocomix"][OVERLAP_METRIC] <= 1
    evaluations = [(branches[name], experiment.checkpoints[name][-1], experiment.metrics[name] | measured[name], {})
                   for name in branches]
    tracker = tracking.MlflowTracker(experiment.run_ids["parent"], experiment.tracking_uri)
    files = stages.write_concepts_report(settings, storage, experiment.data, experiment.labels, evaluations,
                                         tmp_path / "concepts", tracker)
    tracker.close()
    content = json.loads(files.json_path.read_text())
    assert [card["latent"] for card in content["cards"]] == cards.most_chosen(settings.concepts.cards)
    assert content["overlap"] == {"cocomix": [[STEPS * BATCH * BLOCK, measured["cocomix"][OVERLAP_METRIC]]]}
    steered = content["steering"]
    assert [view["concept"] for view in steered] == cards.most_chosen(settings.concepts.steer_concepts)
    assert all(len(view["prompts"]) == settings.concepts.steer_prompts for view in steered)
    assert content["steered_checkpoint"] == f"cocomix {experiment.checkpoints['cocomix'][-1].name}"
    parent = experiment.client.get_run(experiment.run_ids["parent"])
    assert parent.data.metrics[FREQUENCY_METRIC] == pytest.approx(content["floor"])
    logged = {item.path for item in experiment.client.list_artifacts(experiment.run_ids["parent"], "concepts")}
    assert {"concepts/concepts.html", "concepts/concepts.md", "concepts/concept_overlap.png"} <= logged

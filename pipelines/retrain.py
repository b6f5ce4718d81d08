"""Flow `retrain`: rebuild when something changed, promote the new model only when it is better.

1. `dvc status`: if no stage is stale and the registered version of the last run has already been
   decided on (it is the champion, or carries a decision), the flow logs "up to date" and stops.
2. Otherwise the `pipeline` flow runs `dvc repro`; its `register` stage registers the best
   validation fold's model as a new version of the dataset's registered model
   (`l2rclip.config.model_name`: `tracking.model_name`, default `l2rclip-<folder name of data.root>`;
   the champion when there is none yet). Versions of one name are of one dataset: the gate never
   compares models of two datasets.
3. The new version and the champion are scored on the SAME images, which NEITHER trained on: the
   promotion holdout (`outputs/prepare/holdout.csv`, `l2rclip.data.holdout`), each through its own
   registered artifacts (`l2rclip.serving.predictor.Predictor`), with `l2rclip.metrics.ordinal_metrics`.
   A fold's test split would not do: it is redrawn when data changes, so it holds images of the
   champion's training split. The holdout is defined by a stable hash of the group id, so it holds
   no image either model trained on as long as both were made under the same definition
   (`split.holdout_fraction` and `holdout_salt`, tagged on every version as `l2rclip.holdout_spec`);
   versions made under different definitions are not compared, and the champion stays.
4. `decide`: promote (move the `champion` alias) only when the new version is better by more
   than `margin`; otherwise keep. The decision, its reason and the gate set's size and version
   (`l2rclip.gate_images`, `l2rclip.gate_version`) are recorded on the new version, and published
   as the flow run's markdown artifact `retrain-decision` (scores, margin, gate, decision, reason).

The whole flow holds the checkout (`pipelines.checkout_lock`): a second flow running DVC in the
same checkout waits until this one has decided.

    python -m pipelines.retrain --repo . --margin 0.05
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from l2rclip.config import EvalConfig, Params, load_params, model_name
from l2rclip.data.holdout import holdout_version
from l2rclip.evaluation.predictions import probabilities_of
from l2rclip.metrics import lower_is_better, ordinal_metrics
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.registry import (
    DECISION_TAG,
    HOLDOUT_SPEC_TAG,
    KEPT,
    PROMOTED,
    REASON_TAG,
    champion,
    keep,
    promote,
)
from pipelines.checkout_lock import checkout_lock
from pipelines.common import (
    PREPARED,
    REGISTERED,
    project,
    read_json,
    run_cli,
    stale_stages,
    tracking_uri,
)
from pipelines.flow_run import announce_api, checkout_tags, tag_flow_run
from pipelines.pipeline import pipeline

LINEAGE_TAGS = ("l2rclip.data_version", "l2rclip.params_hash")


@dataclass(frozen=True)
class Decision:
    """Whether the new version replaces the champion, and why (recorded on the version)."""

    promote: bool
    reason: str


def decide(new: float, current: float, margin: float = 0.0, metric: str = "test/mae") -> Decision:
    """Promote only when `new` beats the champion's `current` score by more than `margin`.

    A tie, a gain within the margin, or a score that is not a number keeps the champion: replacing
    a model in service needs evidence, and noise between two training runs is not evidence.

    Args:
        new: the new version's score.
        current: the champion's score on the same images.
        margin: the smallest improvement that counts, in the metric's units (>= 0).
        metric: the metric's name, which also says its direction (`lower_is_better`).
    """
    if margin < 0:
        raise ValueError(f"margin: expected a non-negative improvement in {metric} units, found {margin}")
    gain = current - new if lower_is_better(metric) else new - current
    scores = f"{metric} {new:.4f} vs champion {current:.4f} on the same holdout images"
    if math.isfinite(gain) and gain > margin:
        return Decision(True, f"{scores}: better by {gain:.4f} (> margin {margin:g})")
    what = "not a number" if not math.isfinite(gain) else f"better by only {gain:.4f}" if gain > 0 else (
        "no better" if gain == 0 else f"worse by {-gain:.4f}")
    return Decision(False, f"{scores}: {what} (promotion needs > margin {margin:g})")


@task
def score(model_uri: str, store: str, paths: list[str], labels: list[Any], device: str, amp: bool,
          settings: EvalConfig, metric: str) -> float:
    """`metric` of the registered model `model_uri` on the images `paths` with true `labels`."""
    predictor = Predictor.load(model_uri, device=device, tracking_uri=store, amp=amp)
    table = predictor.predict_paths(paths, with_probabilities=True, progress=False)
    unread = table.loc[table["error"] != "", ["path", "error"]]
    if not unread.empty:
        raise ValueError(f"cannot score {model_uri}: {len(unread)} test images unreadable, e.g. "
                         f"{unread.iloc[0]['path']}: {unread.iloc[0]['error']}")
    space = predictor.rank_space
    point = table["pred_rank"].to_numpy(dtype=int) if predictor.model.has_point_rule else None  # CORAL/CORN rule
    metrics = ordinal_metrics(probabilities_of(table, space), space.indices(labels), space.value_array,
                              settings.cs_theta, settings.ece_bins, point)
    name = metric.rsplit("/", 1)[-1]
    if name not in metrics:
        raise ValueError(f"metric {metric!r}: expected test/<name> with name one of {', '.join(sorted(metrics))}")
    return metrics[name]


def _lineage(champion_tags: dict[str, str], new_tags: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """What differs between the champion's training and the new version's: data version, params."""
    return {tag: {"champion": champion_tags.get(tag), "new": new_tags.get(tag)} for tag in LINEAGE_TAGS
            if champion_tags.get(tag) != new_tags.get(tag)}


@flow(name="retrain")
def retrain(repo: str = ".", margin: float = 0.0, metric: str = "test/mae") -> dict[str, Any]:
    """Retrain when data, params or code changed; promote the new version only if it is better.

    Args:
        repo: the project folder; its `params.yaml` names the dataset and so the registered model
            (`l2rclip.config.model_name`).
        margin: the smallest improvement in `metric` that promotes (its units, e.g. 0.05 years).
        metric: `test/<name>` of `l2rclip.metrics.ordinal_metrics`, computed on the promotion holdout.

    Returns:
        `decision` (`promoted` or `kept_champion`), `reason`, `up_to_date` (nothing had changed),
        `name`, `version` (the new one), `champion` (the version that holds the alias now),
        `previous_champion` (the one that held it before), `decided_earlier` (the version had
        been decided on by an earlier run: nothing was compared),
        `stale` (the stages that had to run), `changes` (data version / params hash that differ
        from the champion's), and `scores` when both models were scored.

    Raises:
        RuntimeError: the pipeline registered no model (tracking off, MLflow failing).
    """
    logger = get_run_logger()
    announce_api(logger)
    root = project(repo)
    with checkout_lock(root, log=logger):
        result = _retrain(root, margin, metric)
    tag_flow_run(checkout_tags(root))
    create_markdown_artifact(decision_markdown(result, margin, metric), key="retrain-decision",
                             description=f"{result['name']} version {result['version']}: {result['decision']}")
    return result


def _retrain(root: Path, margin: float, metric: str) -> dict[str, Any]:
    """The flow's steps 1-4 (see the module's docstring), in a checkout the caller holds."""
    logger = get_run_logger()
    params = load_params(root / "params.yaml")
    store = tracking_uri(root)
    name = model_name(params)
    stale = stale_stages(root)
    if stale:
        logger.info("changed since the last run (stages to rebuild): %s", ", ".join(stale))
        pipeline(str(root))
    registered = read_json(root / REGISTERED)
    if not registered or not registered.get("registered"):
        reason = (registered or {}).get("reason", f"no {REGISTERED}; is the register stage in dvc.yaml?")
        raise RuntimeError(f"retrain: the pipeline registered no model: {reason}")
    version = str(registered["version"])
    new = MlflowClient(store).get_model_version(name, version)
    current = champion(name, store)
    held = str(current.version) if current is not None else None  # MLflow gives int or str versions
    result: dict[str, Any] = {"name": name, "version": version, "stale": stale, "up_to_date": not stale,
                              "previous_champion": held,
                              "changes": _lineage(current.tags if current else {}, new.tags)}
    if new.tags.get(DECISION_TAG) or held == version:
        decision = new.tags.get(DECISION_TAG, PROMOTED)
        logger.info("%s version %s was already decided on (%s)%s", name, version, decision,
                    "; up to date" if not stale else "")
        return {**result, "decision": decision, "reason": new.tags.get(REASON_TAG, ""),
                "champion": held, "decided_earlier": True}
    gate = read_holdout(root)
    if current is None:
        decision = Decision(True, "there was no champion")
    elif (mismatch := gate_mismatch(current.tags, new.tags, gate)) is not None:
        decision = Decision(False, mismatch)
    else:
        logger.info("new version %s vs champion %s on the promotion holdout (%d images, version %s); "
                    "lineage differences: %s", version, held, len(gate), holdout_version(gate),
                    result["changes"] or "none (same data and params: code or training changed)")
        result["scores"] = compare(root, params, gate, {"new": version, "champion": held}, name, store, metric)
        decision = decide(result["scores"]["new"], result["scores"]["champion"], margin, metric)
    result["gate"] = {"images": len(gate), "version": holdout_version(gate),
                      "spec": new.tags.get(HOLDOUT_SPEC_TAG)}
    MlflowClient(store).set_model_version_tag(name, version, "l2rclip.gate_images", str(len(gate)))
    MlflowClient(store).set_model_version_tag(name, version, "l2rclip.gate_version", result["gate"]["version"])
    (promote if decision.promote else keep)(name, version, decision.reason, store)
    after = str(champion(name, store).version)
    logger.info("%s version %s: %s; champion is version %s", name, version, decision.reason, after)
    return {**result, "decision": PROMOTED if decision.promote else KEPT, "reason": decision.reason,
            "champion": after, "decided_earlier": False}


def decision_markdown(result: dict[str, Any], margin: float, metric: str) -> str:
    """The decision as the markdown the flow run's artifact shows (`result` as `retrain` returns it)."""
    outcome = "promoted to champion" if result["decision"] == PROMOTED else "not promoted: the champion stays"
    if result["decided_earlier"]:
        outcome = f"already decided by an earlier run ({result['decision']}); nothing compared"
    lines = [f"# Retrain: {result['name']} version {result['version']} {outcome}", "",
             f"**Decision:** `{result['decision']}`: {result['reason'] or 'no reason recorded'}", ""]
    if scores := result.get("scores"):
        new, held = scores["new"], scores["champion"]
        gain = held - new if lower_is_better(metric) else new - held
        lines += [f"| model | version | {metric} on the promotion holdout |", "|---|---|---|",
                  f"| new | {result['version']} | {scores['new']:.4f} |",
                  f"| champion | {result['previous_champion']} | {scores['champion']:.4f} |", "",
                  f"Gain {gain:+.4f} ({'lower' if lower_is_better(metric) else 'higher'} is better); "
                  f"promotion needs more than the margin {margin:g}.", ""]
    if gate := result.get("gate"):
        lines.append(f"- gate: {gate['images']} promotion-holdout images, version `{gate['version']}`, "
                     f"holdout `{gate['spec']}`")
    changes = ", ".join(f"{tag} {pair['champion']} -> {pair['new']}" for tag, pair in result["changes"].items())
    lines += [f"- stages rebuilt: {', '.join(result['stale']) or 'none (up to date)'}",
              f"- lineage changes from the champion: {changes or 'none'}",
              f"- champion before: version {result['previous_champion'] or 'none'}; "
              f"now: version {result['champion']}"]
    return "\n".join(lines) + "\n"


def read_holdout(root: Path) -> pd.DataFrame:
    """The promotion holdout written by the prepare stage (empty when `split.holdout_fraction` is 0)."""
    path = root / PREPARED / "holdout.csv"
    if not path.is_file():
        raise FileNotFoundError(f"expected the promotion holdout at {path}; run `dvc repro prepare`")
    return pd.read_csv(path, dtype={"path": str, "group": str}, keep_default_na=False)


def gate_mismatch(champion_tags: dict[str, str], new_tags: dict[str, str], gate: pd.DataFrame) -> str | None:
    """Why the two versions cannot be compared fairly on `gate`, or None when they can."""
    held, now = champion_tags.get(HOLDOUT_SPEC_TAG), new_tags.get(HOLDOUT_SPEC_TAG)
    if gate.empty:
        return ("no promotion holdout (split.holdout_fraction is 0): no image is kept from both models' "
                "training, so there is no fair comparison; set split.holdout_fraction > 0 and retrain")
    if held is None or held != now:
        return (f"the champion was trained under another promotion holdout ({held or 'none recorded'}, "
                f"now {now}): it may have trained on today's gate images, so the versions are not "
                "compared; set the champion alias by hand (MLflow UI or client) if intended")
    return None


def compare(root: Path, params: Params, gate: pd.DataFrame, versions: dict[str, str], name: str, store: str,
            metric: str) -> dict[str, float]:
    """Score each of `versions` (role -> version of `name`) on the promotion holdout `gate`."""
    paths = [str(root / params.data.root / path) for path in gate["path"]]
    return {role: score(f"models:/{name}/{version}", store, paths, gate["label"].tolist(), params.train.device,
                        params.train.amp, params.eval, metric) for role, version in versions.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the flow once, print the decision as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="project folder (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.0, help="smallest improvement that promotes")
    parser.add_argument("--metric", default="test/mae",
                        help="metric compared on the promotion holdout (default: %(default)s)")
    return run_cli(parser, lambda a: retrain(a.repo, a.margin, a.metric), argv)


if __name__ == "__main__":
    sys.exit(main())

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
   A change of the rank set (labels, values or names, `l2rclip.ranks` on each version) is a change
   of the model's contract: the labels it answers and the `p_<label>` columns it serves. Such a
   version is not compared automatically (the champion stays, the reason names the ranks dropped
   and added); `--accept-rank-change` (`accept_rank_change=True`) compares the two on the holdout
   images of the ranks both share, says so, and lets the better one be promoted. Either way the
   change and whether it was accepted are recorded on the version (`l2rclip.rank_change`), and a
   version refused for it can be decided again with the flag.
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
import json
import math
import shutil
import sys
import tempfile
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
from l2rclip.models.checkpoint import read_model_meta
from l2rclip.ranks import RankSpace
from l2rclip.serving.predictor import Predictor, resolve_model_dir
from l2rclip.serving.registry import (
    DECISION_TAG,
    HOLDOUT_SPEC_TAG,
    KEPT,
    PROMOTED,
    RANKS_TAG,
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
RANK_CHANGE_TAG = "l2rclip.rank_change"
NOT_COMPARED = "not compared (promotion needs --accept-rank-change)"
ACCEPTED = "accepted with --accept-rank-change"


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
    what = (
        "not a number"
        if not math.isfinite(gain)
        else f"better by only {gain:.4f}"
        if gain > 0
        else ("no better" if gain == 0 else f"worse by {-gain:.4f}")
    )
    return Decision(False, f"{scores}: {what} (promotion needs > margin {margin:g})")


@task
def score(
    model_uri: str,
    store: str,
    paths: list[str],
    labels: list[Any],
    device: str,
    amp: bool,
    settings: EvalConfig,
    metric: str,
) -> float:
    """`metric` of the registered model `model_uri` on the images `paths` with true `labels`."""
    predictor = Predictor.load(model_uri, device=device, tracking_uri=store, amp=amp)
    table = predictor.predict_paths(paths, with_probabilities=True, progress=False)
    unread = table.loc[table["error"] != "", ["path", "error"]]
    if not unread.empty:
        raise ValueError(
            f"cannot score {model_uri}: {len(unread)} test images unreadable, e.g. "
            f"{unread.iloc[0]['path']}: {unread.iloc[0]['error']}"
        )
    space = predictor.rank_space
    point = table["pred_rank"].to_numpy(dtype=int) if predictor.model.has_point_rule else None  # CORAL/CORN rule
    metrics = ordinal_metrics(
        probabilities_of(table, space),
        space.indices(labels),
        space.value_array,
        settings.cs_theta,
        settings.ece_bins,
        point,
    )
    name = metric.rsplit("/", 1)[-1]
    if name not in metrics:
        raise ValueError(f"metric {metric!r}: expected test/<name> with name one of {', '.join(sorted(metrics))}")
    return metrics[name]


def _lineage(champion_tags: dict[str, str], new_tags: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """What differs between the champion's training and the new version's: data version, params."""
    return {
        tag: {"champion": champion_tags.get(tag), "new": new_tags.get(tag)}
        for tag in LINEAGE_TAGS
        if champion_tags.get(tag) != new_tags.get(tag)
    }


def version_ranks(name: str, version: Any, store: str) -> RankSpace:
    """The rank set of a registered version: its `l2rclip.ranks` tag, else (older versions) its model.json."""
    if text := version.tags.get(RANKS_TAG):
        return RankSpace.from_dict(json.loads(text))
    folder = tempfile.mkdtemp(prefix="l2rclip-ranks-")
    try:
        return RankSpace.from_dict(
            read_model_meta(resolve_model_dir(f"models:/{name}/{version.version}", store, download_to=folder))[
                "ranks"
            ]
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def rank_change(held: RankSpace, new: RankSpace) -> str | None:
    """What changed from the champion's rank set to the new version's, in one phrase; None when nothing did."""
    if held.to_dict() == new.to_dict():
        return None
    dropped = [label for label in held.labels if not new.contains(label)]
    added = [label for label in new.labels if not held.contains(label)]
    shared = [label for label in held.labels if new.contains(label)]
    revalued = [label for label in shared if held.values[held.index_of(label)] != new.values[new.index_of(label)]]
    renamed = [label for label in shared if held.names[held.index_of(label)] != new.names[new.index_of(label)]]
    parts = [
        f"{what} {', '.join(map(str, labels[:10]))}{' ...' if len(labels) > 10 else ''}"
        for what, labels in (
            ("dropped", dropped),
            ("added", added),
            ("other values for", revalued),
            ("other names for", renamed),
        )
        if labels
    ]
    if not parts:  # the same labels, values and names in another order
        parts = ["the same ranks in another order"]
    return f"the rank set changed from {held.describe()} to {new.describe()} ({'; '.join(parts)})"


def shared_gate(gate: pd.DataFrame, spaces: Sequence[RankSpace]) -> pd.DataFrame:
    """The gate rows whose label is a rank of every one of `spaces`."""
    keep_row = [all(space.contains(label) for space in spaces) for label in gate["label"]]
    return gate[keep_row].reset_index(drop=True)


def _reopened(tags: dict[str, str], accept_rank_change: bool) -> bool:
    """Whether a version refused for a rank change is to be decided again, now that the change is accepted."""
    return accept_rank_change and tags.get(RANK_CHANGE_TAG, "").endswith(NOT_COMPARED)


@flow(name="retrain")
def retrain(
    repo: str = ".", margin: float = 0.0, metric: str = "test/mae", accept_rank_change: bool = False
) -> dict[str, Any]:
    """Retrain when data, params or code changed; promote the new version only if it is better.

    Args:
        repo: the project folder; its `params.yaml` names the dataset and so the registered model
            (`l2rclip.config.model_name`).
        margin: the smallest improvement in `metric` that promotes (its units, e.g. 0.05 years).
        metric: `test/<name>` of `l2rclip.metrics.ordinal_metrics`, computed on the promotion holdout.
        accept_rank_change: a new version whose rank set differs from the champion's is compared
            (on the holdout images of the shared ranks) and may be promoted; without it, it is not
            compared and the champion stays.

    Returns:
        `decision` (`promoted` or `kept_champion`), `reason`, `up_to_date` (nothing had changed),
        `name`, `version` (the new one), `champion` (the version that holds the alias now),
        `previous_champion` (the one that held it before), `decided_earlier` (the version had
        been decided on by an earlier run: nothing was compared),
        `stale` (the stages that had to run), `changes` (data version / params hash that differ
        from the champion's), `scores` when both models were scored, and `rank_change`
        (`change`, `accepted`, `shared_ranks`) when the rank set differs from the champion's.

    Raises:
        RuntimeError: the pipeline registered no model (tracking off, MLflow failing).
    """
    logger = get_run_logger()
    announce_api(logger)
    root = project(repo)
    with checkout_lock(root, log=logger):
        result = _retrain(root, margin, metric, accept_rank_change)
    tag_flow_run(checkout_tags(root))
    create_markdown_artifact(
        decision_markdown(result, margin, metric),
        key="retrain-decision",
        description=f"{result['name']} version {result['version']}: {result['decision']}",
    )
    return result


def _retrain(root: Path, margin: float, metric: str, accept_rank_change: bool = False) -> dict[str, Any]:
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
    result: dict[str, Any] = {
        "name": name,
        "version": version,
        "stale": stale,
        "up_to_date": not stale,
        "previous_champion": held,
        "changes": _lineage(current.tags if current else {}, new.tags),
    }
    if (new.tags.get(DECISION_TAG) and not _reopened(new.tags, accept_rank_change)) or held == version:
        decision = new.tags.get(DECISION_TAG, PROMOTED)
        logger.info(
            "%s version %s was already decided on (%s)%s",
            name,
            version,
            decision,
            "; up to date" if not stale else "",
        )
        return {
            **result,
            "decision": decision,
            "reason": new.tags.get(REASON_TAG, ""),
            "champion": held,
            "decided_earlier": True,
        }
    gate = read_holdout(root)
    if current is None:
        decision = Decision(True, "there was no champion")
    elif (mismatch := gate_mismatch(current.tags, new.tags, gate)) is not None:
        decision = Decision(False, mismatch)
    else:
        decision = _gate_ranks_then_decide(
            root, params, gate, result, (current, new), store, metric, margin, accept_rank_change
        )
    result["gate"] = {
        "images": len(gate),
        "version": holdout_version(gate),
        "spec": new.tags.get(HOLDOUT_SPEC_TAG),
    }
    MlflowClient(store).set_model_version_tag(name, version, "l2rclip.gate_images", str(len(gate)))
    MlflowClient(store).set_model_version_tag(name, version, "l2rclip.gate_version", result["gate"]["version"])
    (promote if decision.promote else keep)(name, version, decision.reason, store)
    after = str(champion(name, store).version)
    logger.info("%s version %s: %s; champion is version %s", name, version, decision.reason, after)
    return {
        **result,
        "decision": PROMOTED if decision.promote else KEPT,
        "reason": decision.reason,
        "champion": after,
        "decided_earlier": False,
    }


def _gate_ranks_then_decide(
    root: Path,
    params: Params,
    gate: pd.DataFrame,
    result: dict[str, Any],
    versions: tuple[Any, Any],
    store: str,
    metric: str,
    margin: float,
    accept_rank_change: bool,
) -> Decision:
    """Check the rank contract of (champion, new) `versions`, then score both on the gate and decide.

    A change of ranks is recorded on the new version and in `result["rank_change"]`; without
    `accept_rank_change` nothing is compared, with it only the gate images of the shared ranks are.
    """
    name, version = result["name"], result["version"]
    spaces = tuple(version_ranks(name, v, store) for v in versions)
    change = rank_change(*spaces)
    if change is not None:
        shared = [label for label in spaces[0].labels if spaces[1].contains(label)]
        result["rank_change"] = {"change": change, "accepted": accept_rank_change, "shared_ranks": shared}
        outcome = ACCEPTED if accept_rank_change else NOT_COMPARED
        MlflowClient(store).set_model_version_tag(name, version, RANK_CHANGE_TAG, f"{change}: {outcome}")
        if not accept_rank_change:
            return Decision(
                False,
                f"{change}: a change of the model's contract (the labels it answers, the "
                "p_<label> columns it serves), so the versions are not compared automatically; "
                "to compare them on the ranks both share and promote the better, run the "
                "retrain flow with --accept-rank-change",
            )
        gate = shared_gate(gate, spaces)
    decision = _compare_and_decide(root, params, gate, result, store, metric, margin)
    if change is None:
        return decision
    return Decision(
        decision.promote,
        f"{decision.reason}; {change}, {ACCEPTED}: compared on the {len(gate)} "
        f"holdout images of the {len(result['rank_change']['shared_ranks'])} ranks "
        "both share",
    )


def _compare_and_decide(
    root: Path, params: Params, gate: pd.DataFrame, result: dict[str, Any], store: str, metric: str, margin: float
) -> Decision:
    """Score the new version and the champion on `gate` (into `result["scores"]`) and decide."""
    if gate.empty:
        return Decision(False, "no promotion-holdout image has a rank both versions share: nothing to compare on")
    get_run_logger().info(
        "new version %s vs champion %s on the promotion holdout (%d images, version %s); lineage differences: %s",
        result["version"],
        result["previous_champion"],
        len(gate),
        holdout_version(gate),
        result["changes"] or "none (same data and params: code or training changed)",
    )
    versions = {"new": result["version"], "champion": result["previous_champion"]}
    result["scores"] = compare(root, params, gate, versions, result["name"], store, metric)
    return decide(result["scores"]["new"], result["scores"]["champion"], margin, metric)


def decision_markdown(result: dict[str, Any], margin: float, metric: str) -> str:
    """The decision as the markdown the flow run's artifact shows (`result` as `retrain` returns it)."""
    outcome = "promoted to champion" if result["decision"] == PROMOTED else "not promoted: the champion stays"
    if result["decided_earlier"]:
        outcome = f"already decided by an earlier run ({result['decision']}); nothing compared"
    lines = [
        f"# Retrain: {result['name']} version {result['version']} {outcome}",
        "",
        f"**Decision:** `{result['decision']}`: {result['reason'] or 'no reason recorded'}",
        "",
    ]
    if scores := result.get("scores"):
        new, held = scores["new"], scores["champion"]
        gain = held - new if lower_is_better(metric) else new - held
        lines += [
            f"| model | version | {metric} on the promotion holdout |",
            "|---|---|---|",
            f"| new | {result['version']} | {scores['new']:.4f} |",
            f"| champion | {result['previous_champion']} | {scores['champion']:.4f} |",
            "",
            f"Gain {gain:+.4f} ({'lower' if lower_is_better(metric) else 'higher'} is better); "
            f"promotion needs more than the margin {margin:g}.",
            "",
        ]
    if gate := result.get("gate"):
        lines.append(
            f"- gate: {gate['images']} promotion-holdout images, version `{gate['version']}`, "
            f"holdout `{gate['spec']}`"
        )
    if ranks := result.get("rank_change"):
        lines.append(f"- rank set: {ranks['change']}; {ACCEPTED if ranks['accepted'] else NOT_COMPARED}")
    changes = ", ".join(f"{tag} {pair['champion']} -> {pair['new']}" for tag, pair in result["changes"].items())
    lines += [
        f"- stages rebuilt: {', '.join(result['stale']) or 'none (up to date)'}",
        f"- lineage changes from the champion: {changes or 'none'}",
        f"- champion before: version {result['previous_champion'] or 'none'}; now: version {result['champion']}",
    ]
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
        return (
            "no promotion holdout (split.holdout_fraction is 0): no image is kept from both models' "
            "training, so there is no fair comparison; set split.holdout_fraction > 0 and retrain"
        )
    if held is None or held != now:
        return (
            f"the champion was trained under another promotion holdout ({held or 'none recorded'}, "
            f"now {now}): it may have trained on today's gate images, so the versions are not "
            "compared; set the champion alias by hand (MLflow UI or client) if intended"
        )
    return None


def compare(
    root: Path, params: Params, gate: pd.DataFrame, versions: dict[str, str], name: str, store: str, metric: str
) -> dict[str, float]:
    """Score each of `versions` (role -> version of `name`) on the promotion holdout `gate`."""
    paths = [str(root / params.data.root / path) for path in gate["path"]]
    return {
        role: score(
            f"models:/{name}/{version}",
            store,
            paths,
            gate["label"].tolist(),
            params.train.device,
            params.train.amp,
            params.eval,
            metric,
        )
        for role, version in versions.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the flow once, print the decision as JSON."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=".", help="project folder (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.0, help="smallest improvement that promotes")
    parser.add_argument(
        "--metric", default="test/mae", help="metric compared on the promotion holdout (default: %(default)s)"
    )
    parser.add_argument(
        "--accept-rank-change",
        action="store_true",
        help="compare a new version whose rank set (labels, values, names) differs from the "
        "champion's on the ranks both share, and let it be promoted (a change of the "
        "served contract; recorded in the decision)",
    )
    return run_cli(parser, lambda a: retrain(a.repo, a.margin, a.metric, a.accept_rank_change), argv)


if __name__ == "__main__":
    sys.exit(main())

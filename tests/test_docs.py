"""The documentation stays true: its links resolve and every command it shows is run by a test.

Pages are README.md and docs/*.md (CONTRIBUTING.md too, for links; its contributor commands, such as
`make test-all` or `pre-commit install`, are tooling, not part of what the pages promise). A
*command* is a line of a ```bash block, or an inline code span whose first word is a program
(`dvc exp show`, `l2rclip predict ...`). `COVERED` maps each command a page may show to the tests
that run it (or, for `make test` and `make docs`, the CI script that does). A page that shows a
command no entry matches fails here, so a new command arrives with its test or not at all; an entry
naming a test that no longer exists fails too, as does an entry no page uses any more.

Beyond matching, the commands that can be checked cheaply are: every `l2rclip ...` line of a block
parses with the real parser, every `python -m pipelines.<flow> ...` line reaches its flow with the
documented arguments, and every `-S key=value` of a documented `dvc exp run` is a valid params key
and value.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINKED_PAGES = [*DOC_PAGES, ROOT / "CONTRIBUTING.md"]
CI_SCRIPT = ROOT / ".ci" / "run"

PROGRAMS = (
    "make",
    "dvc",
    "l2rclip",
    "mlflow",
    "prefect",
    "python",
    "pip",
    "curl",
    "git",
    "torchrun",
    "pytest",
    "pre-commit",
    "benchmarks/gpu_check.sh",
    "L2RCLIP_CLONE=$PWD",
)
SHELL_FENCES = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Covered:
    """Commands matching `pattern` (a regex over the whole command) are run by `evidence`.

    `evidence` names test functions (found by `def <name>(` anywhere under tests/) or `ci:<line>`,
    a line of `.ci/run`. `how` says in words what the evidence runs, where it is not the command
    verbatim.
    """

    pattern: str
    evidence: tuple[str, ...]
    how: str = ""


COVERED = [
    # --- the demo CLIP (docs/demo-clip.md)
    Covered(
        r"dvc repro (-f )?pretrain",
        ("test_stage_writes_fp16_weights_that_load_as_the_demo_clip",),
        "the stage's function on a 3-step budget; the full 2,400-step run is what the page measures",
    ),
    Covered(
        r"make methods|dvc repro studies/methods/dvc\.yaml",
        (
            "test_the_study_runs_end_to_end_and_its_table_shows_the_runs_numbers",
            "test_study_stage_code_deps_cover_its_imports",
        ),
        "the study's stage functions on a tiny setting (3 methods, 1 seed, 1 epoch) and its dvc.yaml's deps; the "
        "full run (`make methods` is `dvc repro studies/methods/dvc.yaml`) is what the page measures",
    ),
    # --- configuration (docs/configuration.md)
    Covered(
        r"l2rclip config validate( --params params\.yaml)?",
        ("test_config_validate_says_valid_or_names_the_problem",),
    ),
    Covered(
        r"l2rclip config schema > params\.schema\.json", ("test_the_committed_json_schema_is_the_generated_one",)
    ),
    Covered(
        r"l2rclip config reference --write docs/configuration\.md",
        ("test_the_reference_in_the_docs_is_the_generated_one",),
    ),
    Covered(
        r"l2rclip prepare",
        (
            "test_bad_yaml_through_the_cli_and_stage_mains_exits_2_with_one_line",
            "test_prepare_never_rewrites_a_demo_set_made_with_other_settings",
        ),
    ),
    # --- the demo set and the curves (docs/operations.md)
    Covered(
        r"dvc repro demo",
        ("test_prepare_never_rewrites_a_demo_set_made_with_other_settings",),
        "the message names it; the demo stage is what `dvc repro` runs first in the pipeline tests",
    ),
    Covered(
        r"python -m l2rclip\.stages\.demo_data --params <file> --out <folder>",
        ("test_bad_yaml_through_the_cli_and_stage_mains_exits_2_with_one_line",),
    ),
    Covered(r"dvc plots diff <exp>\.\.\.", ("test_plots_diff_compares_the_learning_curves_of_experiments",)),
    Covered(
        r"python -m pipelines\.retrain --accept-rank-change",
        ("test_retrain_does_not_compare_a_version_with_another_rank_set_unless_accepted",),
        "the flow parameter accept_rank_change; the command line maps to it",
    ),
    # --- deployment (docs/deployment.md)
    Covered(
        r"(MLFLOW_TRACKING_URI=\S+ )?mlflow models serve -m models:/\S+@champion --env-manager virtualenv"
        r"( -h 127\.0\.0\.1 -p \d+)?",
        ("test_registered_champion_serves_from_a_fresh_virtualenv_like_the_local_pyfunc",),
    ),
    # --- the two commands of the front door, and the site
    Covered(r"make test", ("ci:make test",)),
    Covered(r"make docs", ("ci:make docs",)),
    Covered(
        r"make demo",
        ("test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",),
        "`make demo` is `l2rclip demo`: `dvc repro` of this dvc.yaml (the test runs it on a copy of the "
        "project) then `dvc push` (test_a_second_clone_pulls_the_results_and_has_nothing_to_run)",
    ),
    # --- DVC
    Covered(
        r"dvc repro",
        (
            "test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",
            "test_code_edit_retrains_and_an_unchanged_rerun_changes_nothing",
        ),
    ),
    Covered(
        r"dvc exp run --name cop-half -S loss\.cop=0\.5",
        ("test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",),
    ),
    Covered(r"dvc exp run -S model\.method=coral", ("test_every_method_runs_as_a_dvc_experiment",)),
    Covered(
        r"dvc exp run -S key=value",
        ("test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",),
        "the form, with any dotted params key",
    ),
    Covered(
        r"dvc exp run --name my-faces( -S \S+)+",
        (
            "test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",
            "test_documented_dvc_settings_are_valid_params",
        ),
        "the form runs in the pipeline test; the settings are checked as params here",
    ),
    Covered(
        r"dvc exp run --name reference \$\(l2rclip parity reference\) -S loss\.kl_t2i_target=uniform",
        (
            "test_dvc_set_args_read_back_as_the_same_values",
            "test_a_later_override_of_one_key_still_wins",
            "test_documented_dvc_settings_are_valid_params",
        ),
    ),
    Covered(
        r"dvc exp run( --temp)?",
        (
            "test_ablation_fans_out_to_two_workers_through_shared_remotes",
            "test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",
        ),
        "plain and --temp (a fanned-out variant on a worker)",
    ),
    Covered(
        r"dvc exp show",
        ("test_every_method_runs_as_a_dvc_experiment",),
        "through l2rclip.evaluation.results.collect (`dvc exp show --json`)",
    ),
    Covered(r"dvc metrics diff", ("test_code_edit_retrains_and_an_unchanged_rerun_changes_nothing",)),
    Covered(r"dvc plots show", ("test_the_page_renders_with_no_network",)),
    Covered(r"dvc plots diff exp-a exp-b", ("test_plots_diff_compares_the_learning_curves_of_experiments",)),
    Covered(r"dvc (push|pull|status)", ("test_a_second_clone_pulls_the_results_and_has_nothing_to_run",)),
    Covered(
        r"dvc remote modify --local local url \S+",
        ("test_ablation_fans_out_to_two_workers_through_shared_remotes",),
    ),
    Covered(
        r"dvc exp run --name <protocol> -S \.\.\.",
        ("test_reproduce_runs_a_dvc_experiment_and_prints_the_row",),
        "what `l2rclip reproduce` runs (the test checks that it prints and runs `dvc exp run --name tiny`)",
    ),
    # --- the l2rclip command
    Covered(
        r"l2rclip predict models:/l2rclip-demo@champion data/demo(/images)? --out predictions\.csv",
        ("test_predict_and_the_served_pyfunc_give_the_same_interval_columns", "test_cli_writes_the_csv"),
    ),
    Covered(
        r"l2rclip predict outputs/folds/0/train/best photo\.jpg more_images/ list\.csv --out predictions\.csv",
        (
            "test_cli_writes_the_csv",
            "test_csv_input_resolves_relative_paths",
            "test_folder_with_bad_inputs_keeps_order_and_matches_evaluate",
        ),
        "a local model folder with files, folders and a CSV list",
    ),
    Covered(
        r"l2rclip predict outputs/folds/0/train/best data/demo/images --workers 2 --store outputs/preprocess "
        r"--out predictions\.csv",
        (
            "test_the_store_is_read_instead_of_the_files_with_the_same_predictions",
            "test_streamed_csv_is_the_whole_table_byte_for_byte",
        ),
        "a local model folder on a folder, with decoding threads and the preprocess stage's store",
    ),
    Covered(r"l2rclip predict", ("test_cli_writes_the_csv",)),
    Covered(
        r"l2rclip serve models:/l2rclip-demo@champion --port 5001",
        ("test_l2rclip_serve_answers_without_the_venv_on_path",),
    ),
    Covered(
        r"l2rclip serve",
        (
            "test_l2rclip_serve_answers_without_the_venv_on_path",
            "test_without_a_model_or_a_registered_one_it_says_what_to_do",
        ),
    ),
    Covered(
        r"l2rclip demo",
        ("test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",),
        "what `make demo` runs: see that entry",
    ),
    Covered(r"l2rclip check", ("test_cli_check_prints_what_ran",)),
    Covered(r"l2rclip prepare --help", ("test_prepare_help_names_both_own_data_formats",)),
    Covered(r"l2rclip parity reference", ("test_parity_reference_prints_the_bundle",)),
    Covered(r"l2rclip tag-commits", ("test_dvc_pipeline_reruns_exactly_what_changed_and_tracks_in_mlflow",)),
    Covered(
        r"l2rclip results( --prefix fgnet-m- --readme docs/results\.md --marker fgnet)?",
        ("test_results_table_written_between_markers", "test_documented_l2rclip_commands_parse"),
        "the table writer; the full line parses (its experiments need FG-NET and hours)",
    ),
    Covered(
        r"l2rclip reproduce( \S+ --data \S+( --lists \S+)?( --epochs 1)?( --folds [0-9,]+)?)?",
        ("test_reproduce_runs_a_dvc_experiment_and_prints_the_row", "test_documented_l2rclip_commands_parse"),
    ),
    # --- MLflow
    Covered(
        r"mlflow server --backend-store-uri sqlite:///mlflow\.db --host 127\.0\.0\.1 --port 5000",
        ("test_ablation_fans_out_to_two_workers_through_shared_remotes",),
        "`mlflow server --host --port --backend-store-uri sqlite:///...` as the team's tracking server",
    ),
    Covered(
        r"mlflow models serve( -m <model> --env-manager local)?",
        (
            "test_the_interpreters_folder_goes_first_on_path_once",
            "test_mlflow_models_serve_answers_like_the_predictor",
        ),
    ),
    # --- Prefect
    Covered(
        r"python -m pipelines\.pipeline",
        (
            "test_pipeline_flow_retries_a_killed_stage_and_fails_at_once_on_bad_params",
            "test_documented_flow_commands_reach_the_flow",
        ),
    ),
    Covered(
        r"python -m pipelines\.ablation --jobs 2",
        ("test_ablation_runs_four_experiments_and_compares_them", "test_documented_flow_commands_reach_the_flow"),
    ),
    Covered(
        r"python -m pipelines\.ablation --axis prompt --axis schedule --set train\.epochs=5",
        (
            "test_default_grid_is_rankformer_by_cop_with_the_full_model_first",
            "test_documented_flow_commands_reach_the_flow",
        ),
    ),
    Covered(
        r"python -m pipelines\.ablation --work-pool l2rclip --set 'folds=\[0,1\]'",
        (
            "test_ablation_fans_out_to_two_workers_through_shared_remotes",
            "test_documented_flow_commands_reach_the_flow",
        ),
    ),
    Covered(
        r"python -m pipelines\.retrain --margin 0\.05",
        (
            "test_retrain_promotes_a_better_model_then_is_up_to_date_then_keeps_the_champion",
            "test_documented_flow_commands_reach_the_flow",
        ),
    ),
    Covered(r"python -m pipelines\.deploy", ("test_retrain_served_on_a_cron_schedule_by_a_real_prefect_server",)),
    Covered(
        r'python -m pipelines\.deploy --cron "0 3 \* \* \*" --timezone Europe/Berlin --margin 0\.05',
        (
            "test_retrain_served_on_a_cron_schedule_by_a_real_prefect_server",
            "test_documented_flow_commands_reach_the_flow",
        ),
    ),
    Covered(
        r"python -m pipelines\.deploy --work-pool l2rclip --repo /srv/l2rclip",
        (
            "test_ablation_fans_out_to_two_workers_through_shared_remotes",
            "test_deploy_to_pool_creates_a_process_pool_and_registers_both_flows",
            "test_documented_flow_commands_reach_the_flow",
        ),
    ),
    Covered(
        r"python -m pipelines\.folds --work-pool l2rclip --name fgnet-5fold -S data\.source=fgnet",
        (
            "test_folds_fan_out_as_one_experiment_each_and_summarise_like_the_report",
            "test_documented_flow_commands_reach_the_flow",
        ),
        "its pieces (fold experiments, the summary) and its command line; the dispatch is the "
        "ablation's, run end to end by test_ablation_fans_out_to_two_workers_through_shared_remotes",
    ),
    Covered(
        r"prefect server start( --host 127\.0\.0\.1 --port 4200)?",
        ("test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_nightly_retrain",),
    ),
    Covered(
        r"prefect work-pool create l2rclip --type process",
        ("test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_nightly_retrain",),
    ),
    Covered(
        r"prefect deploy( --all)?",
        ("test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_nightly_retrain",),
    ),
    Covered(
        r"L2RCLIP_CLONE=\$PWD prefect worker start --pool l2rclip --limit 1",
        (
            "test_ablation_fans_out_to_two_workers_through_shared_remotes",
            "test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_nightly_retrain",
        ),
    ),
    # --- stages
    Covered(
        r"python -m l2rclip\.stages\.train --params params\.yaml --fold 0 --prepared outputs/prepare "
        r"--out outputs/folds/0/train",
        ("test_two_processes_follow_one_process_with_the_whole_batch",),
        "the stage's command line, under torchrun with train.devices: 2 on the CPU",
    ),
    Covered(r"python -m l2rclip\.stages\.<name> --help", ("test_prepare_help_names_both_own_data_formats",)),
]


# ------------------------------------------------------------------------------------ reading pages


@dataclass(frozen=True)
class Shown:
    """A command as a page shows it: where, and whether it is a whole line of a shell block."""

    page: Path
    line: int
    command: str
    in_block: bool

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Prose lines (number, text) and fenced-block lines (number, language, text), 1-based."""
    prose: list[tuple[int, str]] = []
    fenced: list[tuple[int, str, str]] = []
    fence: str | None = None
    language = ""
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, language = match.group(1), match.group(2).lower()
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is not None:
            fenced.append((number, language, line))
        else:
            prose.append((number, line))
    return prose, fenced


def strip_comment(line: str) -> str:
    """A shell line without its trailing `# comment` (a `#` inside quotes, or inside a word, is kept)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].strip()
    return line.strip()


def shown_commands(page: Path) -> Iterator[Shown]:
    """Every command `page` shows: shell-block lines (continuations joined) and program-led code spans."""
    prose, fenced = split_fences(page.read_text(encoding="utf-8"))
    pending, start = "", 0
    for number, language, line in fenced:
        if language not in SHELL_FENCES:
            continue
        text = strip_comment(line)
        if pending:
            text, number = f"{pending} {text}", start
        if text.endswith("\\"):
            pending, start = text[:-1].strip(), number
            continue
        pending = ""
        if text:
            yield Shown(page, number, normalise(text), True)
    text = "\n".join(line for _, line in prose)
    first_line = [number for number, _ in prose]
    for match in INLINE_CODE.finditer(text):
        span = normalise(match.group(2))
        words = span.split()
        if len(words) > 1 and not words[1].startswith("(") and any(span.startswith(p + " ") for p in PROGRAMS):
            yield Shown(page, first_line[text.count("\n", 0, match.start())], span, False)


def normalise(command: str) -> str:
    """One spacing, and `.venv/bin/<program>` read as `<program>` (the same program, called by path)."""
    command = " ".join(command.split())
    return command.removeprefix(".venv/bin/")


def all_shown() -> list[Shown]:
    return [shown for page in DOC_PAGES for shown in shown_commands(page)]


def defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.update(re.findall(r"^\s*def (test_\w+)\(", path.read_text(encoding="utf-8"), re.M))
    return names


# ------------------------------------------------------------------------------------ links


def slug(heading: str) -> str:
    """The anchor mkdocs (toc's default slugify) and GitHub give a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    return {slug(line.lstrip("#")) for _, line in prose if re.match(r"#{1,6}\s", line)}


def ignored_by_git(paths: list[Path]) -> set[Path]:
    """The paths git ignores (generated files, not in the repository); none outside a git checkout."""
    if not (ROOT / ".git").exists() or not paths:
        return set()
    done = subprocess.run(
        ["git", "check-ignore", "--", *map(str, paths)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return {Path(line) for line in done.stdout.splitlines()}


def test_every_relative_link_resolves_to_a_file_in_the_repository():
    problems, targets = [], []
    for page in LINKED_PAGES:
        prose, _ = split_fences(page.read_text(encoding="utf-8"))
        for number, line in prose:
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                path_part, _, anchor = target.partition("#")
                where = f"{page.relative_to(ROOT)}:{number}"
                resolved = (page.parent / path_part).resolve() if path_part else page
                if ROOT not in resolved.parents and resolved != ROOT:
                    problems.append(f"{where}: {target} leaves the repository")
                elif not resolved.exists():
                    problems.append(f"{where}: {target} -> {resolved.relative_to(ROOT)} does not exist")
                else:
                    targets.append((where, target, resolved))
                    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                        problems.append(
                            f"{where}: {target}: no heading with the anchor #{anchor} in "
                            f"{resolved.relative_to(ROOT)}"
                        )
    ignored = ignored_by_git([resolved for _, _, resolved in targets])
    problems += [
        f"{where}: {target} is ignored by git (generated, not in the repository)"
        for where, target, resolved in targets
        if resolved in ignored
    ]
    assert not problems, "links that do not resolve:\n" + "\n".join(problems)
    assert len(targets) > 20, f"expected the pages to link each other; found {len(targets)} relative links"


# ------------------------------------------------------------------------------------ commands


def test_every_documented_command_is_run_by_a_test():
    unknown = [
        f"{shown.where()}: {shown.command}"
        for shown in all_shown()
        if not any(re.fullmatch(entry.pattern, shown.command) for entry in COVERED)
    ]
    assert not unknown, (
        "commands shown by a page that no test runs (run them in a test and add them to "
        "COVERED, or take them off the page):\n" + "\n".join(unknown)
    )


def test_every_entry_names_evidence_that_exists_and_is_still_shown():
    tests, ci_lines = defined_tests(), {line.split("#")[0].strip() for line in CI_SCRIPT.read_text().splitlines()}
    shown = [s.command for s in all_shown()]
    problems = []
    for entry in COVERED:
        for evidence in entry.evidence:
            if evidence.startswith("ci:") and evidence[3:] not in ci_lines:
                problems.append(f"{entry.pattern}: .ci/run has no line {evidence[3:]!r}")
            elif not evidence.startswith("ci:") and evidence not in tests:
                problems.append(f"{entry.pattern}: no test function {evidence} under tests/")
        if not any(re.fullmatch(entry.pattern, command) for command in shown):
            problems.append(f"{entry.pattern}: no page shows such a command any more; remove the entry")
    assert not problems, "\n".join(problems)


def block_commands(program: str) -> list[Shown]:
    return [s for s in all_shown() if s.in_block and s.command.split()[0] == program]


def test_documented_l2rclip_commands_parse():
    from l2rclip.cli import build_parser

    commands = block_commands("l2rclip") + [
        s
        for s in all_shown()
        if not s.in_block
        and s.command.startswith(
            ("l2rclip results --", "l2rclip reproduce fgnet-lopo", "l2rclip reproduce utkface")
        )
    ]
    assert len(commands) >= 6, [s.command for s in commands]
    for shown in commands:
        try:
            build_parser().parse_args(shlex.split(shown.command.split(" > ")[0])[1:])
        except SystemExit as exit_info:  # argparse's way of saying a command line is wrong (or --help)
            assert exit_info.code == 0, f"{shown.where()}: `{shown.command}` does not parse"


FLOW_FUNCTIONS = {
    "pipelines.pipeline": ["pipeline"],
    "pipelines.ablation": ["ablation"],
    "pipelines.retrain": ["retrain"],
    "pipelines.folds": ["folds"],
    "pipelines.deploy": ["retrain_deployment", "experiment_deployment", "serve", "deploy_to_pool"],
}


def test_documented_flow_commands_reach_the_flow(monkeypatch, capsys):
    """Each `python -m pipelines.<flow> ...` line of a page parses and hands its values to the flow.

    The flow functions (and, for `pipelines.deploy`, building, serving and registering deployments)
    are replaced by recorders: what runs them for real is named in `COVERED`.
    """
    import importlib

    flows = [
        s
        for s in all_shown()
        if s.command.startswith("python -m pipelines.") and (s.in_block or " -" in s.command)
    ]
    assert len(flows) >= 8, [s.command for s in flows]
    for shown in flows:
        words = shlex.split(shown.command)
        module = importlib.import_module(words[2])
        calls: list[tuple[str, tuple, dict]] = []
        for name in FLOW_FUNCTIONS[words[2]]:

            def record(*args, _name=name, _calls=calls, **kwargs):
                _calls.append((_name, args, kwargs))
                return {}

            monkeypatch.setattr(module, name, record)
        assert module.main(words[3:]) == 0, shown.where()
        capsys.readouterr()  # the flow's result, printed as JSON
        assert calls, f"{shown.where()}: `{shown.command}` ran no flow"
        recorded = repr(calls)
        for value in words[3:]:
            if not value.startswith("-"):
                assert value in recorded or repr(yaml.safe_load(value)) in recorded, (
                    f"{shown.where()}: {value!r} does not reach the flow: {recorded}"
                )


def dvc_settings(command: str) -> dict[str, object]:
    """The `-S key=value` settings of a documented `dvc exp run`, `$(l2rclip parity reference)` expanded."""
    from l2rclip.parity import BUNDLES, shell_words

    command = command.replace("$(l2rclip parity reference)", shell_words(BUNDLES["reference"]))
    words = shlex.split(command)
    settings: dict[str, object] = {}
    for flag, value in zip(words, words[1:], strict=False):
        if flag in ("-S", "--set-param"):
            key, _, text = value.partition("=")
            settings[key] = yaml.safe_load(text)
    return settings


def test_documented_dvc_settings_are_valid_params():
    from l2rclip.config import load_params, to_flat_dict
    from l2rclip.parity import with_overrides

    base = load_params(ROOT / "tests" / "fixtures" / "params.yaml")
    runs = [
        s
        for s in all_shown()
        if s.command.startswith("dvc exp run")
        and " -S " in s.command
        and not re.search(r"key=value|<\w+>|\.\.\.", s.command)
    ]  # not the forms with placeholders
    assert len(runs) >= 4, [s.command for s in runs]
    for shown in runs:
        settings = dvc_settings(shown.command)
        resolved = to_flat_dict(with_overrides(base, settings))  # raises, naming the key, if a setting is bad
        assert {key: resolved[key] for key in settings} == settings, shown.where()


def test_parity_reference_prints_the_bundle(capsys):
    from l2rclip.cli import main
    from l2rclip.parity import REFERENCE, dvc_set_args

    assert main(["parity", "reference"]) == 0
    assert shlex.split(capsys.readouterr().out) == dvc_set_args(REFERENCE)


# ------------------------------------------------------------------------------------ the checker itself


def test_the_reader_finds_block_lines_continuations_and_program_spans(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `dvc exp show` or `dvc.yaml`, not `l2rclip`.\n\n```bash\n"
        "dvc repro   # rebuild\n\nl2rclip predict m \\\n  a.png --out p.csv\n"
        'python -m pipelines.deploy --cron "0 3 * * *"   # nightly\n```\n\n'
        "```yaml\nmake: demo\n```\n",
        encoding="utf-8",
    )
    shown = list(shown_commands(page))
    assert [(s.line, s.command, s.in_block) for s in shown] == [
        (4, "dvc repro", True),
        (6, "l2rclip predict m a.png --out p.csv", True),
        (8, 'python -m pipelines.deploy --cron "0 3 * * *"', True),
        (1, "dvc exp show", False),
    ]
    assert slug("8. Baselines in the `same` harness") == "8-baselines-in-the-same-harness"
    assert slug("MLflow: what ran") == "mlflow-what-ran"


@pytest.mark.parametrize(
    "command",
    [
        "dvc exp run -S model.method=coral",
        "make test",
        "dvc exp run --name my-faces -S data.root=/x -S ranks.stop=9",
    ],
)
def test_known_commands_match_and_unknown_ones_do_not(command):
    assert any(re.fullmatch(entry.pattern, command) for entry in COVERED)
    assert not any(
        re.fullmatch(entry.pattern, command.replace("dvc", "dvcx", 1).replace("make", "mk", 1))
        for entry in COVERED
    )

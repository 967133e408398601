"""The `fedray` command line: data synth|prepare|inspect, train, evaluate, backbones."""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import sys
import threading
from pathlib import Path

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)

# Modules that add their own subcommand with `add_cli(subparsers)`; they import heavy
# libraries (Ray Tune, Serve, the job client) inside their command functions, not at import.
# A command line for one of the subcommands defined here does not import them at all.
COMMAND_MODULES: tuple[str, ...] = (
    "fedray.submit",
    "fedray.artifacts.package",
    "fedray.serving",
    "fedray.experiments.tune",
)


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, catalogue and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    synth = dsub.add_parser("synth", help="write a synthetic smear dataset (class folders + manifest)")
    synth.add_argument("--output", type=Path, required=True)
    synth.add_argument("--n", type=int, default=2000, help="images in all (over every site)")
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--patients-per-class", type=int, default=None,
                       help="patients per class (per site with --sites; default: 20, with --sites 8)")
    synth.add_argument("--sites", type=int, default=None, metavar="K",
                       help="write K hospital folders site_a/ ... (Class/patient/x.png each), "
                            "each with its own stain, scanner, class mix and patients")
    synth.add_argument("--difficulty", type=float, default=None,
                       help="0 = well-separated classes, 1 = calibrated hard (default: 0, with --sites 1)")
    synth.add_argument("--label-noise", type=float, default=0.0, metavar="FRACTION",
                       help="share of images given a random other label (needs --sites)")
    synth.add_argument("--class-concentration", type=float, default=None,
                       help="Dirichlet concentration of each site's class mix (needs --sites; default: 10)")
    synth.add_argument("--workers", type=int, default=1, help="rendering processes")
    synth.set_defaults(func=cmd_data_synth)

    prep = dsub.add_parser("prepare", help="scan a Kaggle ALL (or class-per-folder) image folder")
    prep.add_argument("--source", type=Path, required=True)
    prep.add_argument("--output", type=Path, required=True)
    prep.add_argument("--skip-bad", action="store_true", help="skip and count bad files instead of failing")
    prep.add_argument("--include-segmented", action="store_true",
                      help="use Segmented/ instead of Original/ (Kaggle ALL layout)")
    prep.add_argument("--max-file-mb", type=float, default=None, metavar="MIB",
                      help="size cap per image file; a larger file is a bad file (default: 64)")
    prep.set_defaults(func=cmd_data_prepare)

    inspect = dsub.add_parser("inspect", help="class table, groups and duplicates of a manifest")
    inspect.add_argument("path", type=Path, help="a prepared folder or a manifest.parquet")
    inspect.set_defaults(func=cmd_data_inspect)

    split = dsub.add_parser("split-sites", help="divide one dataset into one site folder per "
                                                "hospital (simulating a consortium)")
    split.add_argument("--source", type=Path, required=True,
                       help="an image folder (any recognised layout) or a prepared folder")
    split.add_argument("--output", type=Path, required=True)
    split.add_argument("--hospitals", type=int, required=True)
    split.add_argument("--scheme", choices=["iid", "dirichlet", "by-group"], default="iid")
    split.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    split.add_argument("--group-column", default="site", help="by-group: the manifest's column")
    split.add_argument("--min-per-hospital", type=int, default=8)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--layout", choices=["folder", "prepared"], default="folder",
                       help="folder: Class/patient/x.png images; prepared: one manifest with the bytes")
    split.set_defaults(func=cmd_data_split_sites)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set federation.rounds=3")


def _add_baseline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--centralized", action="store_true", help="add a Ray Train baseline")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (centralized)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))


def _command_word(argv: list[str]) -> str | None:
    """The subcommand a command line names (the top level has no options taking values)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given `argv` that names a subcommand defined in this module
    (train, data, ...), the COMMAND_MODULES are left unimported."""
    parser = argparse.ArgumentParser(prog="fedray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)

    train = sub.add_parser("train", help="run a federated training")
    _add_config_args(train)
    train.add_argument("--output-dir", type=Path, help="parent folder of the run folder")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run")
    train.add_argument("--report", action="store_true", help="write the HTML/Markdown report at the end")
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="strategies, DP, pooled and local-only arms over "
                                             "the same sites, over seeds, with 95%% intervals")
    _add_config_args(compare)
    compare.add_argument("--strategies", nargs="+", default=["fedavg"])
    compare.add_argument("--dp", action="store_true",
                         help="add FedAvg with DP-SGD in hospitals at --dp-epsilon")
    compare.add_argument("--dp-epsilon", type=float, default=None,
                         help="the DP arm's target epsilon (default: privacy.target_epsilon or 8)")
    compare.add_argument("--local-only", action="store_true",
                         help="add each hospital trained alone, scored at every site")
    compare.add_argument("--seeds", type=int, default=1, help="runs per arm: seed..seed+N-1")
    compare.add_argument("--interval", choices=["bootstrap", "t"], default="bootstrap",
                         help="95%% intervals: bootstrap over seeds and test images (default; "
                              "the t interval is kept beside it), or Student t over seeds")
    compare.add_argument("--summarize", type=Path, metavar="COMPARISON_DIR",
                         help="rewrite an existing comparison's files (e.g. with another "
                              "--interval) from its runs; trains nothing")
    compare.add_argument("--resplit", action="store_true",
                         help="each seed also draws its own local splits (default: every seed "
                              "is scored on the same test patients)")
    _add_baseline_args(compare)
    compare.set_defaults(func=cmd_compare)

    cv = sub.add_parser("cv", help="k-fold cross-validation (federated, + centralized baseline)")
    _add_config_args(cv)
    cv.add_argument("--folds", type=int, default=5)
    _add_baseline_args(cv)
    cv.set_defaults(func=cmd_cv)

    evaluate = sub.add_parser("evaluate", help="evaluate a run's model on its held-out split")
    evaluate.add_argument("run", type=Path)
    evaluate.add_argument("--split", default="test", choices=["val", "test"])
    evaluate.set_defaults(func=cmd_evaluate)

    exp = sub.add_parser("explain", help="saliency / Grad-CAM / IG / LIME overlays for images")
    exp.add_argument("source", type=Path, metavar="RUN_OR_MODEL", help="a run folder")
    exp.add_argument("images", type=Path, nargs="+")
    exp.add_argument("--method", default="gradcam",
                     choices=["saliency", "gradcam", "integrated_gradients", "lime"])
    exp.add_argument("--output", type=Path, default=Path("explanations"))
    exp.set_defaults(func=cmd_explain)

    rep = sub.add_parser("report", help="HTML + Markdown report of a run, or compare several runs")
    rep.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    rep.add_argument("--compare", action="store_true", help="side-by-side table and overlaid curves")
    rep.add_argument("--output-dir", type=Path, help="default: <run>/report; required with --compare")
    rep.add_argument("--explanations", type=int, default=8, help="test images with Grad-CAM (0: none)")
    rep.set_defaults(func=cmd_report)

    backbones = sub.add_parser("backbones", help="list the backbone registry")
    backbones.set_defaults(func=cmd_backbones)
    if argv is not None and _command_word(argv) in sub.choices:
        return parser
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fedray.data import synth

    if args.sites is None:
        if args.label_noise or args.class_concentration is not None:
            raise ValueError("--label-noise and --class-concentration need --sites (use --sites 1)")
        per_class = 20 if args.patients_per_class is None else args.patients_per_class
        difficulty = 0.0 if args.difficulty is None else args.difficulty
        table = synth.generate(n=args.n, size=args.size, seed=args.seed, patients_per_class=per_class,
                               difficulty=difficulty, workers=args.workers)
        manifest = synth.write_folder(table, args.output)
        print(f"wrote {table.num_rows} images and {manifest}")
        return 0
    concentration = (synth.DEFAULT_CLASS_CONCENTRATION if args.class_concentration is None
                     else args.class_concentration)
    table = synth.generate_sites(
        n=args.n, size=args.size, seed=args.seed, sites=args.sites,
        patients_per_class=8 if args.patients_per_class is None else args.patients_per_class,
        difficulty=1.0 if args.difficulty is None else args.difficulty,
        label_noise=args.label_noise, class_concentration=concentration, workers=args.workers)
    *manifests, pooled = synth.write_sites(table, args.output)
    for manifest in manifests:
        print(f"wrote {manifest.parent}/ ({manifest.parent.name}: Class/patient/*.png)")
    print(f"wrote {table.num_rows} images from {len(manifests)} sites; all sites: {pooled}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from fedray.data import catalog

    cap = catalog.DEFAULT_MAX_FILE_MB if args.max_file_mb is None else args.max_file_mb
    cat = catalog.scan(args.source, skip_bad=args.skip_bad, include_segmented=args.include_segmented,
                       max_file_mb=cap)
    args.output.mkdir(parents=True, exist_ok=True)
    table = cat.table.replace_schema_metadata(
        {**(cat.table.schema.metadata or {}), b"fedray.root": str(cat.root.resolve()).encode()})
    out = args.output / "manifest.parquet"
    pq.write_table(table, out)
    print(f"layout: {cat.layout}; {table.num_rows} images; manifest: {out}")
    print(cat.class_table())
    print(f"duplicate groups (byte-identical): {len(cat.duplicates)}")
    for group in cat.duplicates[:10]:
        print("  " + " == ".join(group))
    if cat.skipped:
        print(f"skipped {len(cat.skipped)} bad files/folders:")
        for item in cat.skipped[:20]:
            print(f"  {item.path}: {item.reason}")
    return 0


def cmd_data_split_sites(args: argparse.Namespace) -> int:
    from fedray.config import load_config
    from fedray.data import sites

    config = load_config(None, [f"data.partition.scheme={args.scheme}",
                                f"data.partition.alpha={args.alpha}",
                                f"data.partition.group_column={args.group_column}",
                                f"data.partition.min_per_hospital={args.min_per_hospital}"])
    table = sites.read_site(args.source, config.data)
    folders = sites.split_sites(table, config.data, args.hospitals, args.seed, args.output,
                                layout=args.layout)
    print(f"{table.num_rows} images from {args.source} into {len(folders)} site folders "
          f"({args.scheme}); whole patients stay in one site")
    print("data:\n  source: sites\n  sites:")
    for name, folder in folders.items():
        print(f"    {name}: {{path: {folder.resolve()}}}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    path = args.path / "manifest.parquet" if args.path.is_dir() else args.path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.parquet (run `fedray data prepare` first)")
    table = pq.read_table(path, columns=None)
    labels = table.column("label").to_pylist()
    print(f"{path}: {table.num_rows} images")
    for name in sorted(set(labels)):
        print(f"  {name:10s} {labels.count(name):6d}")
    hashes = table.column("sha256").to_pylist()
    print(f"duplicate images: {len(hashes) - len(set(hashes))}")
    if "group" in table.column_names:
        print(f"groups: {len(set(table.column('group').to_pylist()))}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fedray.experiments import experiment
    from fedray.config import load_config

    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's own config.yaml; drop --config")
        config = experiment.load_run_config(args.resume, args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    result = experiment.run(config, output_dir=args.output_dir, resume=args.resume)
    if args.report:
        from fedray.report import build_report

        html, _ = build_report(result.run_dir)
        print(f"report: {html}")
    print(f"outputs: {result.run_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedray.experiments.compare import run_comparison
    from fedray.config import load_config

    if args.summarize:
        from fedray.experiments.compare import resummarize

        folder = resummarize(args.summarize, args.interval)
        print(f"comparison: {folder / 'comparison.md'}")
        return 0
    config = load_config(args.config, args.overrides)
    folder = run_comparison(config, args.strategies, centralized=args.centralized, dp=args.dp,
                            output_dir=args.output_dir, workers=args.workers,
                            local_only=args.local_only, seeds=args.seeds,
                            dp_epsilon=args.dp_epsilon, resplit=args.resplit,
                            interval=args.interval)
    print(f"comparison: {folder / 'comparison.md'}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from fedray.config import load_config
    from fedray.experiments.cv import run_cv

    config = load_config(args.config, args.overrides)
    folder = run_cv(config, folds=args.folds, centralized=args.centralized,
                    output_dir=args.output_dir, workers=args.workers)
    print(f"cross-validation: {folder / 'cv.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedray.experiments.experiment import evaluate_run
    from fedray.metrics import format_table

    metrics = evaluate_run(args.run, args.split)
    print(format_table({args.split: metrics}))
    print(json.dumps({"confusion_matrix": metrics["confusion_matrix"]}))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from fedray.explain import explain_files

    paths = explain_files(args.source, args.images, args.method, args.output)
    print(f"wrote {len(paths) - 1} overlays and {paths[-1]}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedray.report import build_report, compare_runs

    if args.compare:
        if not args.output_dir:
            raise ValueError("--compare needs --output-dir")
        paths = compare_runs(args.runs, args.output_dir)
    else:
        if len(args.runs) != 1:
            raise ValueError("give one run folder, or use --compare")
        paths = build_report(args.runs[0], args.output_dir, explanations=args.explanations)
    print("\n".join(map(str, paths)))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    del args
    from fedray.models import BACKBONES, available_backbones

    usable = set(available_backbones())
    for name, spec in BACKBONES.items():
        mark = "" if name in usable else "  (library not installed)"
        print(f"{name:20s} input {spec.input_size:4d}px  {spec.source}{mark}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"fedray: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `fedray` console command: `main`, then a prompt exit.

    A command that started a local Ray stops it here, before the interpreter exits: Ray's own
    exit hook would first sleep half a second for log lines that this command has already
    printed. Then the exit hooks run (logging, temporary folders, Ray's), the output is
    flushed, and the process leaves with `os._exit`, skipping the interpreter's teardown of
    torch and its other modules (about 1.5 s on 2 cores), which frees nothing the operating
    system does not. Every file a command writes is closed before its function returns. A
    command that raises, or that leaves a non-daemon thread running, exits the ordinary way.
    """
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.exit(code)  # the interpreter joins them first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()

"""The run report: sections, embedded figures, cross-site matrix, leakage and shortcut checks.

One tiny run (2 hospitals, 2 rounds, 32 px smallcnn) is trained in-process with LocalPool (no
Ray) and written the way experiment.run writes it; a second, tampered copy carries an injected
train/test duplicate and DP epsilons, so the alarms are seen to fire, not only to stay quiet.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedray import report
from fedray.federation.client import HospitalClient
from fedray.federation.coordinator import Coordinator, LocalPool
from fedray.data.pipeline import build_shards
from fedray.data.shards import ShardSet

from conftest import tiny_config


def make_run(run_dir: Path, synth_table: pa.Table, rounds: int) -> Path:
    """What experiment.run leaves behind, without Ray: config, shards, metrics, weights."""
    config = tiny_config(run_dir, **{"federation.rounds": rounds})
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    shards = build_shards(synth_table, config.data, config.federation.hospitals, config.seed,
                          run_dir / "data")
    clients = [HospitalClient(name, shards.path(file), config, run_dir / "hospitals" / name,
                              num_threads=1)
               for name, file in shards.hospitals.items()]
    coord = Coordinator(config, run_dir, LocalPool(clients), shards, num_threads=1)
    while coord.run_round() is not None:
        pass
    coord.finish()
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synth_table) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny-a", synth_table, rounds=2)


@pytest.fixture(scope="module")
def built(run_dir: Path) -> tuple[Path, Path]:
    return report.build_report(run_dir, explanations=4)


@pytest.fixture(scope="module")
def summary(built: tuple[Path, Path]) -> dict:
    return json.loads((built[0].parent / "report.json").read_text())


def tamper(src: Path, dst: Path) -> Path:
    """A copy of the run with one test image copied into hospital_a's training shard, and an
    epsilon in every hospital's round metrics (as a DP run records it)."""
    shutil.copytree(src, dst)
    data = dst / "data"
    shards = ShardSet.load(data)
    train_path = shards.path(shards.hospitals["hospital_a"])
    train = pq.read_table(train_path)
    test_row = pq.read_table(shards.path(shards.test)).slice(0, 1).select(train.column_names)
    pq.write_table(pa.concat_tables([train, test_row.cast(train.schema)]), train_path)
    records = [json.loads(line) for line in (dst / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        for i, metrics in enumerate(rec["hospitals"].values()):
            metrics["epsilon"] = 0.5 * rec["round"] + i
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return dst


@pytest.fixture(scope="module")
def tampered(run_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    dst = tamper(run_dir, tmp_path_factory.mktemp("tampered") / "tiny-tampered")
    html_path, _ = report.build_report(dst, tmp_path_factory.mktemp("tampered-report"),
                                       explanations=0)
    return html_path, json.loads((html_path.parent / "report.json").read_text())


def section(markdown: str, title: str) -> str:
    """The Markdown between heading `title` and the next second-level heading."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(block: str) -> list[list[str]]:
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


# ---- the report as a whole ---------------------------------------------------------------------
def test_report_files_land_in_run_report_folder(run_dir: Path, built: tuple[Path, Path]) -> None:
    html_path, md_path = built
    assert html_path == run_dir / "report" / "report.html"
    assert md_path == run_dir / "report" / "report.md"
    assert html_path.stat().st_size > 10_000 and md_path.stat().st_size > 1_000


def test_html_is_self_contained_with_every_section(built: tuple[Path, Path]) -> None:
    text = built[0].read_text()
    for title in report.TITLES.values():
        assert f"<h2>{title}</h2>" in text, title
    sources = re.findall(r'src="([^"]*)"', text)
    pngs = sorted(p for p in built[0].parent.glob("*.png") if p.name != "overview.png")
    assert len(sources) == len(pngs) >= 6
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in text and "<link" not in text and "<script" not in text


def test_markdown_references_the_pngs_written_beside_it(built: tuple[Path, Path]) -> None:
    md = built[1].read_text()
    for title in report.TITLES.values():
        assert f"## {title}" in md, title
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(p.name for p in built[1].parent.glob("*.png")
                                    if p.name != "overview.png")
    assert "backbone | smallcnn" in md and "stop reason | completed all rounds" in md


def test_every_png_is_a_real_picture(built: tuple[Path, Path]) -> None:
    pngs = list(built[0].parent.glob("*.png"))
    assert {"curves.png", "confusion_test.png", "roc_test.png", "timing.png",
            "cross_site.png", "overview.png"} <= {p.name for p in pngs}
    for png in pngs:
        with Image.open(png) as img:
            assert img.format == "PNG"
            assert img.width >= 200 and img.height >= 150, (png.name, img.size)
            assert np.asarray(img.convert("L"), dtype=np.float32).std() > 0, png.name


def test_test_metrics_match_what_the_run_recorded(run_dir: Path, built: tuple[Path, Path],
                                                  summary: dict) -> None:
    recorded = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert summary["test"]["accuracy"] == pytest.approx(recorded["accuracy"])
    assert summary["test"]["kappa"] == pytest.approx(recorded["kappa"], abs=1e-9)
    md = built[1].read_text()
    rows = table_rows(section(md, report.TITLES["test"]))
    assert [r[0] for r in rows] == ["Benign", "Early", "Pre", "Pro"]
    assert "Cohen's kappa" in md and "weights changed" not in md


def test_data_table_has_every_shard_with_its_counts(run_dir: Path,
                                                    built: tuple[Path, Path]) -> None:
    counts = ShardSet.load(run_dir / "data").counts
    rows = {r[0]: r for r in table_rows(section(built[1].read_text(), report.TITLES["data"]))}
    for name in ("hospital_a", "hospital_b", "val", "test"):
        assert int(rows[name][-1]) == sum(counts[name].values()), name


def test_privacy_section_says_dp_was_off(built: tuple[Path, Path]) -> None:
    assert "Differential privacy was off" in built[1].read_text()
    assert not (built[0].parent / "epsilon.png").exists()


# ---- cross-site validation ----------------------------------------------------------------------
def test_cross_site_matrix_has_global_plus_each_hospital(built: tuple[Path, Path],
                                                         summary: dict) -> None:
    cs = summary["cross_site"]
    assert cs["rows"] == ["global", "local hospital_a", "local hospital_b"]
    assert cs["columns"][-1] == "global val" and len(cs["columns"]) == len(cs["sizes"])
    values = np.array(cs["accuracy"] + cs["balanced_accuracy"], dtype=np.float64)
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    rows = table_rows(section(built[1].read_text(), report.TITLES["cross_site"]))
    assert [r[0] for r in rows] == cs["rows"]
    assert all(len(r) == 1 + len(cs["columns"]) for r in rows)


# ---- leakage ------------------------------------------------------------------------------------
def test_normal_run_shares_no_image_between_splits(built: tuple[Path, Path], summary: dict) -> None:
    leak = summary["leakage"]
    assert leak["shared"] == 0 and set(leak["pairs"].values()) == {0}
    assert leak["stale_hashes"] == 0 and leak["recorded"]["sha256"] == 0
    assert "LEAKAGE" not in built[0].read_text()
    rows = table_rows(section(built[1].read_text(), report.TITLES["checks"]))
    assert ["any two splits", "0"] in rows


def test_injected_duplicate_is_counted_and_shown_in_red(tampered: tuple[Path, dict]) -> None:
    html_path, data = tampered
    assert data["leakage"]["shared"] == 1
    assert data["leakage"]["pairs"] == {"train/val": 0, "train/test": 1, "val/test": 0}
    assert data["leakage"]["recorded"]["sha256"] == 0  # leakage.json predates the edit
    text = html_path.read_text()
    summary_html = text.split("<h2>Run summary</h2>", 1)[1].split("<h2>", 1)[0]
    assert '<p class="alert">LEAKAGE: 1 image(s) shared' in summary_html  # at the top, too
    assert '<p class="alert">LEAKAGE: 1 image(s) appear' in text
    assert '<td class="alert">1</td>' in text


# ---- shortcut baseline --------------------------------------------------------------------------
def test_mean_colour_baseline_is_reported_beside_the_model(built: tuple[Path, Path],
                                                           summary: dict) -> None:
    base = summary["mean_colour_baseline"]
    assert 0 <= base["accuracy"] <= 1 and 0 <= base["balanced_accuracy"] <= 1
    assert base["n_train"] > 0 and base["n_test"] > 0
    flag = report.shortcut_flag(summary["test"]["balanced_accuracy"], base["balanced_accuracy"])
    assert summary["shortcut_flag"] is flag
    # Measured on this tiny run (synthetic smears hide class in morphology, not colour): the
    # model ~0.64 accuracy / 0.68 balanced, the colour baseline ~0.17 / 0.29.
    assert summary["test"]["accuracy"] > base["accuracy"] and not flag
    assert ("SHORTCUT RISK" in built[0].read_text()) is flag
    rows = table_rows(section(built[1].read_text(), report.TITLES["checks"]))
    assert [r[0] for r in rows if r[0] in ("model", "mean-colour baseline")] == \
           ["model", "mean-colour baseline"]


def test_shortcut_flag_needs_a_margin_of_ten_points() -> None:
    assert report.shortcut_flag(0.50, 0.45)  # better, but not by 0.10
    assert report.shortcut_flag(0.30, 0.45)  # worse than colour alone
    assert not report.shortcut_flag(0.55, 0.45)  # exactly the margin counts as enough
    assert not report.shortcut_flag(0.90, 0.30)


# ---- differential privacy and timing ------------------------------------------------------------
def test_epsilon_per_hospital_is_plotted_when_recorded(tampered: tuple[Path, dict]) -> None:
    html_path, _ = tampered
    assert (html_path.parent / "epsilon.png").is_file()
    md = html_path.with_suffix(".md").read_text()
    rows = table_rows(section(md, report.TITLES["privacy"]))
    assert rows == [["hospital_a", "1.000"], ["hospital_b", "2.000"]]  # round 2: 0.5*2 + i
    assert "Differential privacy was off" not in md


def test_round_timing_splits_fit_time_into_phases() -> None:
    record = {"hospitals": {"a": {"seconds": 3.0}, "b": {"seconds": 4.0}},
              "timings": {"fit_s": 5.0, "broadcast_s": 0.5, "aggregate_s": 0.2,
                          "evaluate_s": 0.3}}
    assert report.round_timing(record) == {"broadcast": 0.5, "local training": 4.0,
                                           "gather": 0.5, "aggregation": 0.2, "evaluation": 0.3}
    record["timings"] = {"fit_s": 3.5, "aggregate_s": 0.0, "evaluate_s": 0.0}  # no Ray broadcast
    assert report.round_timing(record)["gather"] == 0.0  # clamped, never negative


# ---- explanations -------------------------------------------------------------------------------
def test_explanations_grid_or_an_honest_unavailable(built: tuple[Path, Path],
                                                     tampered: tuple[Path, dict]) -> None:
    assert "Explanations unavailable: none requested" in tampered[0].read_text()
    try:
        import fedray.explain  # noqa: F401
    except ImportError:
        pytest.skip("fedray.explain is not available; the section says so")
    assert (built[0].parent / "explanations.png").is_file()
    assert "Explanations unavailable" not in built[0].read_text()


# ---- comparing runs -----------------------------------------------------------------------------
def test_compare_runs_puts_both_runs_side_by_side(run_dir: Path, synth_table: pa.Table,
                                                  tmp_path: Path) -> None:
    other = make_run(tmp_path / "tiny-b", synth_table, rounds=1)
    html_path, md_path = report.compare_runs([run_dir, other], tmp_path / "cmp")
    rows = table_rows(md_path.read_text())
    assert [r[0] for r in rows] == ["tiny-a", "tiny-b"]
    assert [r[5] for r in rows] == ["2", "1"]  # rounds run
    text = html_path.read_text()
    assert "tiny-a" in text and "tiny-b" in text
    assert re.findall(r'src="([^"]{22})', text) == ["data:image/png;base64,"]
    with Image.open(tmp_path / "cmp" / "compare_curves.png") as img:
        assert img.width >= 200 and np.asarray(img.convert("L")).std() > 0

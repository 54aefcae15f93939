"""The GPU check without a GPU: the offline script's dry run on a bundle made here (no download), the
import guard it runs under, the bundle's manifest and install checks, and the runner's stages (time
limits, a report line per stage whatever happened before)."""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fastgrpo.perf import gpu_check

REPO = Path(__file__).resolve().parents[2]


def _load_gpu_bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gb = _load_gpu_bundle()


def repack_installed(distribution: str, dest: Path) -> Path:
    """A wheel of an installed distribution, rebuilt from its files (no download): the same
    modules, metadata, entry points and tags as the wheel it was installed from."""
    dist = md.distribution(distribution)
    files = [f for f in dist.files if f.parts[0] != ".." and "__pycache__" not in f.parts]
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    tags = [line.split(":", 1)[1].strip().split("-") for line in dist.read_text("WHEEL").splitlines()
            if line.startswith("Tag:")]
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))  # py2-none-any + py3-... -> py2.py3-none-any
    wheel = dest / f"{info.removesuffix('.dist-info')}-{tag}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in files:
            source = Path(dist.locate_file(f))
            if f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json") or not source.is_file():
                continue
            data = source.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            archive.writestr(str(f), data)
            record.append(f"{f},sha256={digest},{len(data)}")
        archive.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return wheel


def make_bundle(folder: Path) -> Path:
    """A bundle like `make gpu-bundle`'s, made offline: every WHEELS entry (pip too, which the
    install runs from its wheel) repacked from this environment, with a manifest for this Python."""
    wheels_dir = folder / "wheels"
    wheels_dir.mkdir(parents=True)
    wheels = [(repack_installed(requirement.split("==")[0], wheels_dir), requirement, reason)
              for requirement, reason in gb.WHEELS]
    gb.write_manifest(folder, wheels, [], python=f"{sys.version_info.major}.{sys.version_info.minor}")
    return folder


def test_offline_dry_run_installs_the_bundle_without_an_index_and_prints_the_plan(tmp_path):
    """The lent machine's command, --dry-run: the bundle installs into a fresh folder with pip
    --no-index, fastgrpo.kernels comes from there, everything the stages import imports under the
    image-only guard, pytest collects stage a, and the plan names every stage with its limit."""
    bundle = make_bundle(tmp_path / "bundle")
    report = tmp_path / "report"
    proc = subprocess.run(["bash", "scripts/gpu_check_offline.sh", "--dry-run", "--bundle", str(bundle),
                           "--report-dir", str(report)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"installed {len(gb.WHEELS) - 1} wheels" in out
    for stage in gpu_check.STAGES:
        assert f"{stage.key:<8} limit {stage.limit_s:>3} s" in out
    assert "lora     skipped" in out
    checks = len(gpu_check.STAGE_IMPORTS) + 4  # + two stage scripts, one grade, pytest's collection
    assert f"dry run: {checks} of {checks} checks passed" in out
    kernels_dir = next(line for line in out.splitlines() if line.startswith("fastgrpo from ")).split()[-1]
    assert Path(kernels_dir).name == "kernels" and Path(kernels_dir).parent.name == "fastgrpo"
    assert not Path(kernels_dir).is_relative_to(REPO)  # the installed copy, not the working tree
    assert (report / "dry-run.txt").read_text().strip().endswith(f"{checks} of {checks} checks passed")


def test_guard_hides_what_is_neither_in_the_image_nor_installed(tmp_path):
    """Under the guard, math-verify (in this venv, not in the image: a wheel the bundle would lack)
    is absent, to find_spec too, while the image's torch and transformers import."""
    gb.write_guard(tmp_path / "guard")
    code = ("import importlib.util, torch, transformers; print(importlib.util.find_spec('math_verify'));"
            "import math_verify")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "guard")})
    assert proc.returncode == 1
    assert proc.stdout.strip() == "None"
    assert "No module named 'math_verify'" in proc.stderr


def test_bundle_pins_the_versions_make_test_runs_with():
    for requirement, reason in gb.WHEELS:
        name, version = requirement.split("==")
        assert reason
        if name != "pip":  # pip runs the install; the venv's own pip version is irrelevant
            assert md.version(name) == version, f"{name}: bundle {version}, this environment {md.version(name)}"


def test_manifest_refuses_a_bundle_over_the_limit(tmp_path, monkeypatch):
    wheel = tmp_path / "a-1.0-py3-none-any.whl"
    wheel.write_bytes(b"x" * 2048)
    monkeypatch.setattr(gb, "LIMIT_BYTES", 1024)
    with pytest.raises(RuntimeError, match=r"over the 0 MiB limit"):
        gb.write_manifest(tmp_path, [(wheel, "a==1.0", "test")], [])
    assert not (tmp_path / gb.MANIFEST).exists()


def test_install_refuses_a_wheel_that_differs_from_its_manifest(tmp_path):
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "a-1.0-py3-none-any.whl"
    wheel.write_bytes(b"one")
    gb.write_manifest(tmp_path, [(wheel, "a==1.0", "test")], [])
    wheel.write_bytes(b"two")
    with pytest.raises(RuntimeError, match=r"a-1.0-py3-none-any.whl is missing or differs from the manifest"):
        gb.install(tmp_path, tmp_path / "site")
    with pytest.raises(FileNotFoundError, match="make gpu-bundle"):
        gb.install(tmp_path / "nothing", tmp_path / "site")


def _stage(key, code, limit_s):
    return gpu_check.Stage(key, f"stage {key}", limit_s, lambda report, scratch: ["-c", code],
                           lambda report: f"summary of {key}")


def test_every_stage_gets_a_report_line_after_a_failure_and_a_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", (
        _stage("kernels", "import sys; sys.exit(3)", 60),
        _stage("bench", "import time; time.sleep(120)", 1),
        _stage("grpo", "print('fine')", 60),
    ))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.jsonl").write_text('{"stale": "from an earlier run"}\n')
    rc = gpu_check.run_all(tmp_path, ["kernels", "bench", "grpo", "lora"], total_limit_s=200, spent_s=4.0)
    report = (tmp_path / "report.md").read_text()
    assert rc == 1
    assert "| stage kernels | FAILED (exit 3) |" in report
    assert "| stage bench | TIMED OUT at 1 s |" in report
    assert "| stage grpo | passed |" in report and "summary of grpo" in report
    assert "| install the bundle (scripts/gpu_check_offline.sh) | passed | 4 |" in report
    assert "| d. LoRA and shared prompts | skipped: " in report
    assert (tmp_path / "bench.log").read_text().startswith("$ ")
    assert not (tmp_path / "bench").exists()  # a rerun does not report the last run's measurements


def test_stages_past_the_total_limit_are_skipped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGES", (_stage("kernels", "pass", 60), _stage("bench", "pass", 60)))
    rc = gpu_check.run_all(tmp_path, ["bench"], total_limit_s=25, spent_s=10.0)
    report = (tmp_path / "report.md").read_text()
    assert rc == 1 and "stage kernels" not in report
    assert re.search(r"\| stage bench \| skipped: [0-5] s left of the 25 s total \|", report), report


def test_unknown_stage_names_the_valid_ones():
    with pytest.raises(SystemExit, match=r"unknown stages \['gemm'\]; valid: kernels, bench, grpo, lora"):
        gpu_check.selected_stages(["bench", "gemm"])
    assert gpu_check.selected_stages(["grpo", "kernels"]) == ["kernels", "grpo"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_bench_shapes_predictions_and_table():
    """Stage b's pieces that need no GPU: the R1 micro-batch from the recipe, the roofline shape and
    GPU it is compared with, and the table's ratios."""
    bench = _load_script("gpu_kernel_bench")
    from fastgrpo.kernels import roofline

    assert bench.r1_microbatch_shape() == ("r1-microbatch", (16384, 1536, 151936, 16))
    assert bench.roofline_shape("r1-microbatch", 16384, 1536, 151936) is roofline.SHAPES["train-16k"]
    assert bench.roofline_shape("odd", 7, 8, 9) == roofline.Shape("odd", N=7, H=8, V=9)
    gpu, note = bench.roofline_gpu("NVIDIA B200")
    assert gpu is roofline.GPUS["H100"] and "NVIDIA B200 is not in" in note
    assert bench.roofline_gpu("NVIDIA H100 80GB HBM3") == (roofline.GPUS["H100"], "")
    assert bench.roofline_gpu("NVIDIA H200") == (roofline.GPUS["H200"], "")  # an H200 is its own row, not an H100
    common = {"shape": "s", "N": 1, "H": 2, "V": 3, "median_ms": 1.0}
    records = [{**common, "label": "naive", "best_ms": 3.0, "peak_extra_mb": 100.0, "predicted_ms": 2.5},
               {**common, "label": "matmul_floor", "best_ms": 2.0, "peak_extra_mb": 50.0},
               {**common, "label": "fastgrpo", "best_ms": 2.2, "peak_extra_mb": 20.0, "predicted_ms": 1.9,
                "loss_check": "ok"}]
    table = bench.format_tables(records, [{"kernel": "_k", "registers": 128, "spills": 0, "shared_bytes": 2048,
                                           "warps": 8, "stages": 2}], note)
    assert "| s 1 x 2 x 3 | naive | 3 | 1 | 1.50 | 2.5 | 100 | 1.00 | - |" in table
    assert "| s 1 x 2 x 3 | fastgrpo | 2.2 | 1 | 1.10 | 1.9 | 20 | 0.20 | ok |" in table
    assert "| _k | 128 | 0 | 2.0 | 8 | 2 |" in table and note in table
    failed = {**common, "label": "liger", "error": "ImportError('liger')"}
    assert "| s 1 x 2 x 3 | liger | failed: ImportError('liger') |" in bench.format_tables(records + [failed], [], "")

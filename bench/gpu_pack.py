"""The wheelhouse the GPU run carries: `make bench-gpu-pack` (issue 11).

    python -m bench.gpu_pack [--python-version 3.12] [--dest .gpu-wheels] [--check]

Downloads, here, manylinux x86_64 wheels for the target Python of what the service's
inference path needs on JAX (bench/gpu-requirements.txt, pinned by requirements.lock),
leaving out what the GPU machine already has (bench/gpu-provided.txt: jax, jaxlib, numpy,
pillow and jax's own dependencies, at the machine's versions). Then it proves the result:

- it resolves: `pip install --dry-run --no-index` from the wheelhouse alone, with each
  provided package stood in for by a metadata-only wheel of the machine's version
  (`numpy 2.5.2+provided`, ...), so a wheel that pins `numpy<2.5` fails here, not there;
- every wheel it holds is used, and nothing resolved comes from anywhere else;
- it fits: the tracked tree plus the wheelhouse stay under the device's 64 MiB carry limit.

`--check` runs the proofs on an existing wheelhouse without downloading. On the machine,
bench/gpu_bench.sh installs it with `pip install --no-index --no-deps --target`, and
`check_installed` verifies every requirement against what is importable there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "bench/gpu-requirements.txt"
PROVIDED = ROOT / "bench/gpu-provided.txt"
LOCK = ROOT / "requirements.lock"
# The benchmarks' own pins (locust and what it brings), as `make peers` installs them.
PEERS = ROOT / "bench/peers/requirements.txt"
# The device copies the tree and the carried paths, 64 MiB in all (issue 11).
CARRY_LIMIT_MIB = 64
# The GPU machine runs Python 3.12.3 (a glibc 2.39 distribution): manylinux_2_28 wheels fit.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
LOCAL_LABEL = "provided"


class PackError(RuntimeError):
    """The wheelhouse cannot be built, does not resolve, or would not fit."""


def normalize(name: str) -> str:
    """PEP 503 project name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> list[str]:
    """Requirement lines of a file, comments and blanks dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines as {normalized name: version}."""
    pins = {}
    for line in read_names(path):
        name, _, version = line.partition("==")
        pins[normalize(name)] = version.strip()
    return pins


def pins_from_env(names: list[str]) -> dict[str, str]:
    """The versions this interpreter has of `names` (the CPU proof's "machine")."""
    return {name: importlib.metadata.version(name) for name in names}


def make_stub(
    name: str, version: str, folder: Path, requires: tuple[str, ...] = (), label: str = LOCAL_LABEL
) -> Path:
    """A metadata-only wheel `name==version+provided`: stands for a package the target
    machine already has, so the resolver checks every pin against its version.
    (`requires` and `label` let the tests make wheels with pins of their own.)"""
    dist, full = name.replace("-", "_"), f"{version}+{label}" if label else version
    info = f"{dist}-{full}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n"
    files = {
        f"{info}/METADATA": metadata + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: imgcls\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"])
    path = folder / f"{dist}-{full}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in files.items():
            whl.writestr(member, text)
    return path


def constraints(provided: dict[str, str], folder: Path) -> Path:
    """requirements.lock and the peers' pins (no extras: pip refuses them in constraints)
    without the provided packages, plus `name==version+provided`."""
    pins = read_names(LOCK) + [line for line in read_names(PEERS) if "[" not in line]
    lines = [line for line in pins if normalize(line.split("==")[0]) not in provided]
    lines += [f"{name}=={version}+{LOCAL_LABEL}" for name, version in provided.items()]
    path = folder / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def target_options(python_version: str) -> list[str]:
    """pip options selecting wheels for CPython `python_version` on manylinux x86_64."""
    abi = "cp" + python_version.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    options += ["--abi", abi]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def pip(*args: str) -> subprocess.CompletedProcess:
    """Run this interpreter's pip; raise PackError with its output on failure."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise PackError(f"pip {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def download(dest: Path, python_version: str, provided: dict[str, str], work: Path) -> None:
    """Fetch the wheels of the requirements and their dependencies into `dest`, then drop
    the stand-ins of the provided packages (they are never shipped)."""
    stubs = work / "stubs"
    stubs.mkdir(exist_ok=True)
    names = [make_stub(name, v, stubs).name for name, v in provided.items()]
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):  # a fresh set each time (pip's cache makes it quick)
        stale.unlink()
    pip("download", "-q", *target_options(python_version), "--find-links", str(stubs), "-d", str(dest),
        "-c", str(constraints(provided, work)), "-r", str(REQUIREMENTS))  # fmt: skip
    for name in names:
        (dest / name).unlink(missing_ok=True)


def resolve(dest: Path, python_version: str, provided: dict[str, str], work: Path) -> dict:
    """Resolve the requirements offline from `dest` plus the provided stand-ins; checks
    that every wheel of `dest` is used and nothing else is. Returns {name: version}."""
    stubs = work / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, version in provided.items():
        make_stub(name, version, stubs)
    report = work / "report.json"
    pip("install", "--dry-run", "--no-index", "--ignore-installed", *target_options(python_version),
        "--find-links", str(dest), "--find-links", str(stubs), "--target", str(work / "target"),
        "--report", str(report), "-c", str(constraints(provided, work)), "-r", str(REQUIREMENTS))  # fmt: skip
    resolved, used = {}, set()
    for item in json.loads(report.read_text())["install"]:
        meta, url = item["metadata"], item["download_info"]["url"]
        resolved[normalize(meta["name"])] = meta["version"]
        used.add(url.rsplit("/", 1)[-1])
    unused = sorted(p.name for p in dest.glob("*.whl") if p.name not in used)
    if unused:
        raise PackError(f"wheels in {dest} that nothing needs: {unused}")
    wrong = {
        n: v for n, v in provided.items() if resolved.get(n, f"{v}+{LOCAL_LABEL}") != f"{v}+{LOCAL_LABEL}"
    }
    if wrong:
        raise PackError(f"provided packages resolved to other versions: {wrong}")
    return resolved


def tree_bytes() -> int:
    """Bytes of what the device copies of the tree: tracked and untracked, not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout  # fmt: skip
    paths = [ROOT / p for p in out.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_size(dest: Path, limit_mib: float = CARRY_LIMIT_MIB) -> tuple[int, int]:
    """(tree bytes, wheelhouse bytes); PackError if together they pass `limit_mib`."""
    tree, wheels = tree_bytes(), folder_bytes(dest)
    if tree + wheels > limit_mib * 2**20:
        raise PackError(f"tree {tree / 2**20:.1f} MiB + wheelhouse {wheels / 2**20:.1f} MiB "
                        f"is over the carry limit of {limit_mib} MiB")  # fmt: skip
    return tree, wheels


def check_installed(site: Path) -> list[str]:
    """Requirements of the distributions installed in `site` that nothing importable
    satisfies (missing, or at a version outside the range); [] when all are met."""
    from packaging.requirements import Requirement

    problems = []
    for dist in importlib.metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: {have} is installed")
    return problems


def unpack(wheels: Path, site: Path) -> int:
    """Install wheels by unzipping them into `site` (for a machine without pip); their count."""
    import shutil

    count = 0
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as whl:
            whl.extractall(site)
        count += 1
    for data in site.glob("*.data"):
        for lib in ("purelib", "platlib"):
            for item in (data / lib).glob("*") if (data / lib).is_dir() else []:
                shutil.copytree(
                    item, site / item.name, dirs_exist_ok=True
                ) if item.is_dir() else shutil.copy2(item, site)
        shutil.rmtree(data)
    return count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python-version", default="3.12", help="target CPython (3.12: the GPU machine)")
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels", help="wheelhouse folder")
    parser.add_argument(
        "--provided-from-env",
        action="store_true",
        help="take the provided packages' versions from this interpreter (the CPU proof) "
        "instead of bench/gpu-provided.txt (the GPU machine)",
    )
    parser.add_argument(
        "--check", action="store_true", help="only check an existing wheelhouse (no download)"
    )
    parser.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB, help="carry limit (64)")
    parser.add_argument("--check-installed", type=Path, metavar="SITE",
                        help="on the target machine: check every requirement of what SITE holds")  # fmt: skip
    parser.add_argument("--unpack", type=Path, metavar="WHEELS", help="install WHEELS by unzipping (no pip)")
    parser.add_argument("--into", type=Path, metavar="SITE", help="where --unpack installs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build (unless --check), resolve, size; print the sizes. Exit 1 with the reason on failure."""
    args = parse_args(argv)
    if args.unpack:
        print(f"unpacked {unpack(args.unpack, args.into)} wheels into {args.into}")
        return 0
    if args.check_installed:
        problems = check_installed(args.check_installed)
        print("\n".join(problems) or f"every requirement of {args.check_installed} is met")
        return 1 if problems else 0
    provided = read_pins(PROVIDED)
    if args.provided_from_env:
        provided = pins_from_env(list(provided))
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-pack-") as tmp:
            if not args.check:
                download(args.dest, args.python_version, provided, Path(tmp))
            elif not any(args.dest.glob("*.whl")):
                raise PackError(f"no wheelhouse at {args.dest}: run `make bench-gpu-pack` first")
            resolved = resolve(args.dest, args.python_version, provided, Path(tmp))
        tree, wheels = check_size(args.dest, args.limit_mib)
    except PackError as exc:
        print(f"bench-gpu-pack: {exc}", file=sys.stderr)
        return 1
    shipped = len(list(args.dest.glob("*.whl")))
    print(f"{args.dest}: {shipped} wheels for CPython {args.python_version}, resolves offline with "
          f"{', '.join(f'{n} {v}' for n, v in provided.items())} provided ({len(resolved)} packages)")  # fmt: skip
    print(f"carry: tree {tree / 2**20:.1f} MiB + wheelhouse {wheels / 2**20:.1f} MiB = "
          f"{(tree + wheels) / 2**20:.1f} MiB of {args.limit_mib:g} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

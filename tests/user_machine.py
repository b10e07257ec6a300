"""A user's machine as the env tests see it: `resolve` a requirements file the way pip does there (no
workplace config), read the chosen wheels' contents without downloading them whole (`remote_wheel`), and put
fake system commands (`fake_command`: python3.10, nvidia-smi) in front of the env scripts' checks."""

import io
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path


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
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--report", str(report), "-r", str(requirements)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
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
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

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
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=120) as r:
            assert r.status == 206, f"{self.url} ignores HTTP Range requests (status {r.status})"
            data = r.read()
        self.pos += len(data)
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

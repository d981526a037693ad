"""GGUF files of a benchmark checkpoint, made with llama.cpp's own tools: its `convert_hf_to_gguf.py` (bf16)
and its quantizer (`llama_model_quantize`, through llama-cpp-python) for Q8_0 and Q4_K_M.

The converter is not on PyPI: it ships inside llama-cpp-python's source distribution (`vendor/llama.cpp`),
so `llama_cpp_source` finds an extracted llama.cpp tree, extracts a given sdist, or downloads the sdist of the
installed llama-cpp-python version with pip. The converter runs in its own process with llama.cpp's vendored
`gguf-py` first on the path (the one it was written against).

Two things stand between the converter and a random-weight checkpoint: it needs a tokenizer (we write a
synthetic one, `synthetic_tokenizer.py`), and it names the pre-tokenizer by hashing how the tokenizer splits a
test string, refusing hashes it does not know. Ours splits text with GLM-4's regex, so the process declares
it as llama.cpp's `glm4` pre-tokenizer by replacing `get_vocab_base_pre` before converting.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.synthetic_tokenizer import add_synthetic_tokenizer

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# GGUF file types made here and llama.cpp's name for each (`llama_ftype`).
QUANT_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}

_CONVERT = r"""
import sys
src, model_dir, outfile = sys.argv[1:4]
sys.path.insert(0, src)
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "bf16", "--outfile", outfile]
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"  # GLM-4's split regex, see gguf_export.py
convert_hf_to_gguf.main()
"""


def llama_cpp_source(workdir: Path, src: str | None = None, sdist: str | None = None) -> Path:
    """A llama.cpp source tree holding `convert_hf_to_gguf.py`: `src` if given, else extracted (once) under
    `workdir` from `sdist` or from llama-cpp-python's sdist downloaded with pip."""
    if src:
        path = Path(src)
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"{path} has no convert_hf_to_gguf.py (give a llama.cpp source tree)")
        return path
    tree = workdir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    workdir.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        log.info("downloading the llama-cpp-python %s sdist for llama.cpp's converter", LLAMA_CPP_PYTHON_VERSION)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(workdir)], check=True)
        sdist = str(workdir / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name and (
            m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name or "/gguf-py/" in m.name)]
        archive.extractall(workdir, members=members, filter="data")
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"{sdist} did not hold vendor/llama.cpp/convert_hf_to_gguf.py")
    return tree


def convert_to_gguf(model_dir: Path, out: Path, src: Path) -> Path:
    """bf16 GGUF of an HF-layout checkpoint by llama.cpp's converter (once; the tokenizer is added first)."""
    if out.is_file():
        return out
    add_synthetic_tokenizer(model_dir)
    partial = out.with_suffix(".partial.gguf")
    result = subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(model_dir), str(partial)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{result.stderr[-4000:]}")
    partial.rename(out)
    return out


def quantize_gguf(bf16: Path, out: Path, quant: str, threads: int) -> Path:
    """`quant` (Q8_0 or Q4_K_M) GGUF from the bf16 one, by llama.cpp's quantizer (once)."""
    import llama_cpp

    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = threads
    partial = out.with_suffix(".partial.gguf")
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed: {bf16} → {quant}")
    partial.rename(out)
    return out


def gguf_tensor_types(path: Path) -> dict[str, tuple[str, int, int]]:
    """{tensor name: (GGML type name, number of elements, bytes)} of a GGUF file, from its header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors}

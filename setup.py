"""Build script for arpg-kernels.

The Python packages always install. The CPU kernels `arpg_kernels._cpu` (csrc/cpu/) are built on every
machine with a working C++ compiler (without one, one line says so and the reference ops serve CPU
tensors). The CUDA extension `arpg_kernels._C` (csrc/) is built when a CUDA toolkit is found and torch
is a CUDA build, or when FORCE_CUDA=1; ARPG_SKIP_CUDA_BUILD=1 skips it.
Whether this machine has a GPU plays no part. torch comes from the environment:

    pip install --no-build-isolation -e .

Each extension built is noted in `arpg_kernels/_build.json` with the torch (and CUDA) it was built
against; under another torch minor release the package says so in one line and does not load it.

Environment: CUDA_HOME (the toolkit; otherwise found through `nvcc`, which may be a wrapper script),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; the kernels need sm_80+), MAX_JOBS (default 2),
FORCE_CUDA, ARPG_SKIP_CUDA_BUILD, ARPG_LOCAL_VERSION (`auto`: the torch/CUDA pair in the version, for
release wheels; scripts/build_wheels.sh sets it).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0"

# Console scripts, "name = module:function".
ENTRY_POINTS: dict[str, list[str]] = {
    "console_scripts": ["arpg = arpg.cli:main", "arpg-bench = arpg.bench.run:main"],
}


# Runtime and extra dependencies with the ranges we support. .ci/run installs the newest release each range
# allows, in a fresh virtual environment, and runs the suite: raise an upper bound only after it has passed
# with that release.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.15",
    "numpy>=2.0,<2.5",
    "safetensors>=0.4,<0.9",
    "pillow>=10,<13",
    "tqdm>=4.60,<5",
]
_PLOTS = ["matplotlib>=3.8,<3.12", "scikit-learn>=1.4,<1.10"]
_HUB = ["huggingface_hub>=2.0,<3"]  # published weights by name (arpg.hub); tested with 2.4
_DIFFUSERS = ["diffusers>=0.42,<1", *_HUB]  # arpg.diffusers_pipeline; tested with 0.42.1
EXTRAS_REQUIRE = {
    "test": ["pytest>=8,<10", "hypothesis>=6.100,<7", "pytest-benchmark>=4,<6", "triton>=3.6,<3.9", *_PLOTS,
             *_DIFFUSERS],
    "bench": _PLOTS,
    "hub": _HUB,
    "diffusers": _DIFFUSERS,
}


def _log(message: str) -> None:
    line = f"arpg_kernels: {message}"
    print(line, file=sys.stderr, flush=True)
    # pip captures a build backend's output and shows it only with -v or on failure; the person at the
    # terminal should still see whether a few minutes of nvcc are coming, so write there too.
    # (Only once: pip runs this file for the metadata first, then for the build.)
    if not sys.stderr.isatty() and "dist_info" not in sys.argv and "egg_info" not in sys.argv:
        try:
            with open("/dev/tty", "w") as tty:
                print(line, file=tty, flush=True)
        except OSError:
            pass


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and any(
        (path / sub / "cuda_runtime.h").is_file() for sub in ("include", "targets/x86_64-linux/include")
    )


def _toolkit_of_nvcc(nvcc: str) -> Path | None:
    """The toolkit behind an `nvcc` on PATH, which may be a symlink or a wrapper script that execs the real one."""
    real = Path(os.path.realpath(nvcc))
    if _is_toolkit(real.parent.parent):
        return real.parent.parent
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if match:
        top = Path(os.path.realpath(match.group(1).strip()))
        if _is_toolkit(top):
            return top
    return None


def find_cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and _is_toolkit(Path(value)):
            return Path(value)
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for nvcc in candidates:
        if nvcc and Path(nvcc).exists():
            home = _toolkit_of_nvcc(nvcc)
            if home is not None:
                return home
    return None


def _extra_cuda_includes(cuda_home: Path) -> list[str]:
    """ATen's CUDA headers include cublas_v2.h and cusparse.h, which a slim toolkit may lack; the
    nvidia-* wheels that come with torch carry them."""
    if (cuda_home / "include" / "cublas_v2.h").is_file() and (cuda_home / "include" / "cusparse.h").is_file():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        for include in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.isfile(os.path.join(include, h)) for h in ("cublas_v2.h", "cusparse.h")):
                found.append(include)
    return found


def cuda_extension_plan():
    """(reason the extension is skipped or None, cuda_home)."""
    if _flag("ARPG_SKIP_CUDA_BUILD"):
        return "ARPG_SKIP_CUDA_BUILD is set", None
    force = _flag("FORCE_CUDA")
    try:
        import torch
    except ImportError:
        return "torch is not importable here (install torch first, then pip install --no-build-isolation)", None
    cuda_home = find_cuda_home()
    if torch.version.cuda is None and not force:
        return f"CPU-only torch {torch.__version__}: torch.version.cuda is None", None
    if cuda_home is None:
        if force:
            raise RuntimeError("arpg_kernels: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)", None
    return None, cuda_home


def cuda_extension(cuda_home: Path):
    os.environ["CUDA_HOME"] = str(cuda_home)  # read by torch.utils.cpp_extension when it is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils.cpp_extension import CUDAExtension

    # Kernels (cuda/*.cu) are torch-free and go through nvcc; adapters and schemas (*.cpp) through the
    # host compiler only, which keeps the torch headers out of nvcc and the build short.
    files = [*CSRC.glob("ops/*.cpp"), *CSRC.glob("cuda/*.cpp"), *CSRC.glob("cuda/*.cu"), CSRC / "python_module.cpp"]
    sources = sorted(str(p.relative_to(ROOT)) for p in files)
    system_includes = [arg for inc in _extra_cuda_includes(cuda_home) for arg in ("-isystem", inc)]
    _log(
        f"building the CUDA extension with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST="
        f"{os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']} "
        "(a few minutes; ARPG_SKIP_CUDA_BUILD=1 skips it)"
    )
    ext = CUDAExtension(
        name="arpg_kernels._C",
        sources=sources,
        include_dirs=[str(CSRC / "include"), str(CSRC / "cuda")],
        extra_compile_args={
            "cxx": ["-O3", "-DPy_LIMITED_API=0x030A0000", *system_includes],
            "nvcc": ["-O3", "-lineinfo", *system_includes],
        },
        py_limited_api=True,
    )
    return ext


CPU_EXTENSION = "arpg_kernels._cpu"


def cpu_extension():
    """The CPU kernels (csrc/cpu/), built on every machine. at::parallel_for is OpenMP in torch's headers,
    so the code must be compiled with OpenMP for the work to spread over threads."""
    from torch.utils.cpp_extension import CppExtension

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return CppExtension(
        name=CPU_EXTENSION,
        sources=sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("cpu/*.cpp")),
        include_dirs=[str(CSRC / "include")],
        extra_compile_args={"cxx": ["-O3", "-ffp-contract=fast", "-DPy_LIMITED_API=0x030A0000", *openmp], "nvcc": []},
        extra_link_args=openmp,
        py_limited_api=True,
    )


def record_build(package_dir: Path, ext: str) -> None:
    """Note in `_build.json` beside the extension what it was built against (read by arpg_kernels/_build.py,
    which refuses to load an extension under another torch)."""
    import torch

    record_path = package_dir / "_build.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    entry = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if ext == "_C":
        entry.update(cuda=torch.version.cuda, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST))
    record[ext] = entry
    package_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def build_ext_class():
    """torch's BuildExtension, except that a CPU-kernel build failure is one line, not a failed install:
    the reference ops then serve CPU tensors."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        def build_extension(self, ext):
            if ext.name != CPU_EXTENSION:
                super().build_extension(ext)
            else:
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001 - any compiler failure
                    _log(f"could not compile the CPU kernels ({type(exc).__name__}: {exc}); CPU tensors use the reference ops")
                    return
            # A wheel takes the record from the build folder; an editable install copies only the
            # extensions into the source tree, so the record is written there too.
            dirs = {Path(self.get_ext_fullpath(ext.name)).parent}
            if self.inplace or getattr(self, "editable_mode", False):
                dirs.add(ROOT / Path(*ext.name.split(".")[:-1]))
            for folder in dirs:
                record_build(folder, ext.name.rsplit(".", 1)[-1])

    return BuildExt.with_options(use_ninja=True)


def base_version() -> str:
    """The one place the version is written is arpg_kernels/_version.py; read, not imported (no torch needed)."""
    match = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "arpg_kernels" / "_version.py").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError("arpg_kernels/_version.py has no `__version__ = \"...\"` line")
    return match.group(1)


def local_version(with_cuda: bool) -> tuple[str, list[str]]:
    """ARPG_LOCAL_VERSION=auto (scripts/build_wheels.sh) names the torch/CUDA pair in the version, as
    flash-attn and xformers do (`0.1.0+cu130torch2.14`, `0.1.0+cputorch2.14`), and pins torch to that
    minor release, whose C++ ABI the extensions link against. Any other non-empty value is used as is.
    Returns (version, install_requires)."""
    version, requires = base_version(), list(INSTALL_REQUIRES)
    tag = os.environ.get("ARPG_LOCAL_VERSION", "").strip()
    if not tag:
        return version, requires
    if tag == "auto":
        import torch

        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        cuda = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
        tag = f"{cuda}torch{major}.{minor}"
        requires = [f"torch>={major}.{minor},<{major}.{int(minor) + 1}" if r.startswith("torch") else r for r in requires]
    if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", tag):
        raise RuntimeError(f"ARPG_LOCAL_VERSION={tag!r} is not a valid local version (letters, digits and dots)")
    return f"{version}+{tag}", requires


CLASSIFIERS = [
    "Development Status :: 3 - Alpha",
    "Intended Audience :: Science/Research",
    "Operating System :: POSIX :: Linux",
    "Programming Language :: C++",
    "Programming Language :: Python :: 3",
    "Programming Language :: Python :: 3 :: Only",
    "Programming Language :: Python :: 3.11",
    "Environment :: GPU :: NVIDIA CUDA",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
]


def main() -> None:
    ext_modules = []
    cmdclass = {}
    options = {}
    # The CUDA plan first: it sets CUDA_HOME, which torch.utils.cpp_extension reads when first imported.
    reason, cuda_home = cuda_extension_plan()
    if reason is None:
        ext_modules.append(cuda_extension(cuda_home))
    else:
        _log(f"building without the CUDA extension ({reason})")
    try:
        import torch  # noqa: F401
    except ImportError:
        _log("building without the CPU kernels (torch is not importable here)")
    else:
        ext_modules.append(cpu_extension())
    if ext_modules:
        cmdclass["build_ext"] = build_ext_class()
        options["bdist_wheel"] = {"py_limited_api": "cp310"}
    version, install_requires = local_version(with_cuda=reason is None)

    setup(
        name="arpg-kernels",
        version=version,
        description="Paged attention kernels (Triton, CUDA, CPU) and a decoding engine for ARPG random-order image generation",
        long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
        long_description_content_type="text/markdown",
        license="MIT",
        license_files=["LICENSE"],
        classifiers=CLASSIFIERS,
        keywords=["ARPG", "autoregressive image generation", "paged attention", "KV cache", "Triton", "CUDA"],
        packages=find_packages(include=["arpg_kernels", "arpg_kernels.*", "arpg", "arpg.*"]),
        package_data={"arpg": ["data/*.safetensors", "data/*.json"]},
        python_requires=">=3.10",
        install_requires=install_requires,
        extras_require=EXTRAS_REQUIRE,
        entry_points=ENTRY_POINTS,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options=options,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()

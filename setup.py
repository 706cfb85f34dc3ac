"""Native extensions of optical_kernels (package metadata lives in pyproject.toml).

* ``optical_kernels._cpu_<isa>`` — fused CPU Sinkhorn (csrc/cpu, C++17 + OpenMP + pybind11),
  the same sources compiled once per instruction set: on x86-64 ``_cpu_base`` (the
  compiler's default ISA, SSE2), ``_cpu_avx2`` (``-march=x86-64-v3``: AVX2 + FMA) and
  ``_cpu_avx512`` (``-march=x86-64-v4``); elsewhere ``_cpu_base`` only. backends/cpu.py
  picks the best one the running CPU supports at import (``OPTICAL_KERNELS_CPU_ISA``
  overrides), so one wheel runs on every x86 host. ``OPTICAL_KERNELS_CPU_VARIANTS=base,avx2``
  builds a subset; ``OPTICAL_KERNELS_NATIVE=1`` adds ``_cpu_native`` (``-march=native``,
  preferred at import when present: only for a build used on the machine that built it).
  ``OPTICAL_KERNELS_SKIP_CPU=1`` installs without them (the ``torch`` backend remains).
* ``optical_kernels._cuda`` — CUDA kernels (csrc/cuda/*.cu + csrc/cuda/bindings.cpp, plain
  CUDA + pybind11, no torch headers, cudart linked statically). Built when csrc/cuda exists
  and ``nvcc`` is found (``$CUDA_HOME/bin/nvcc`` or on ``PATH``).
  ``OPTICAL_KERNELS_CUDA_ARCHS`` (default ``"80;90"``) lists the SASS targets; PTX of the
  highest one is embedded too. ``OPTICAL_KERNELS_SKIP_CUDA=1`` skips it.

Sources compile in parallel (``MAX_JOBS``, default: number of CPUs).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CPU_DIR = Path("csrc") / "cpu"
CUDA_DIR = Path("csrc") / "cuda"
COMMON_DIR = Path("csrc") / "common"  # headers included by both (okc_constants.h)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def _log(msg: str) -> None:
    print(f"optical_kernels setup: {msg}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_home(nvcc: str) -> Path | None:
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper script)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    cands += [str(Path(os.path.realpath(nvcc)).parent.parent), "/usr/local/cuda"]
    try:  # a wrapper script: ask nvcc where it lives
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                cands.insert(2, line.split("TOP=", 1)[1].strip().strip('"'))
    except OSError:
        pass
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def _cuda_libdir(home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


def _sources(d: Path, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in d.iterdir() if p.suffix in suffixes)


class BuildExt(build_ext):
    """build_ext that compiles sources in parallel, probes OpenMP/-march, and drives nvcc."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            raise RuntimeError(
                "optical_kernels: MSVC is not supported; build with g++ or clang, or set "
                "OPTICAL_KERNELS_SKIP_CPU=1 (and OPTICAL_KERNELS_SKIP_CUDA=1) to install "
                "the pure-PyTorch package"
            )
        cxx = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else None
        if cxx is None or shutil.which(cxx) is None:
            raise RuntimeError(
                f"optical_kernels: no C++ compiler found (looked for {cxx!r}). Install one "
                "(Debian/Ubuntu: apt-get install g++; macOS: xcode-select --install) or set "
                "OPTICAL_KERNELS_SKIP_CPU=1 to install without the fused CPU backend "
                "(backend='torch' still works)."
            )
        self._cxx_flags, self._ld_flags = self._probe_flags()
        keep = []
        for ext in self.extensions:
            isa = getattr(ext, "_isa_flags", None)
            if isa and not self._try_compile(isa):
                _log(f"the compiler rejects {' '.join(isa)}: not building {ext.name}")
                continue
            keep.append(ext)
        self.extensions = keep
        super().build_extensions()

    # ------------------------------------------------------------------ probing
    def _try_compile(self, flags: list[str], link: list[str] | None = None) -> bool:
        code = (
            "#include <cstdio>\n#ifdef _OPENMP\n#include <omp.h>\n#endif\n"
            "int main(){int s=0;\n#pragma omp parallel for reduction(+:s)\n"
            'for(int i=0;i<4;++i) s+=i; std::printf("%d", s); return 0;}\n'
        )
        cxx = list(getattr(self.compiler, "compiler_cxx", None) or self.compiler.compiler_so)[:1]
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cpp"
            src.write_text(code)
            cmd = [*cxx, *flags, str(src), "-o", str(Path(tmp) / "probe"), *(link or [])]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True)
            except OSError:
                return False
            return r.returncode == 0

    def _probe_flags(self) -> tuple[list[str], list[str]]:
        cxx = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=fast"]
        if self._try_compile(["-Wno-psabi"]):
            cxx.append("-Wno-psabi")
        ld: list[str] = []
        if self._try_compile(["-fopenmp"], ["-fopenmp"]):
            cxx.append("-fopenmp")
            ld.append("-fopenmp")
        elif self._try_compile(["-Xpreprocessor", "-fopenmp"], ["-lomp"]):
            cxx += ["-Xpreprocessor", "-fopenmp"]
            ld.append("-lomp")
        else:
            _log(
                "WARNING: the C++ compiler has no OpenMP; _cpu is built single-threaded "
                "(install libgomp / libomp for multi-core solves)"
            )
        return cxx, ld

    # ------------------------------------------------------------------ building
    def build_extension(self, ext: Extension) -> None:
        ext_path = Path(self.get_ext_fullpath(ext.name))
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp) / ext.name.replace(".", "_")
        tmp.mkdir(parents=True, exist_ok=True)
        is_cuda = any(s.endswith(".cu") for s in ext.sources)
        nvcc = getattr(ext, "_nvcc", None)
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        jobs = _jobs()
        nvcc_threads = max(1, jobs // max(1, min(jobs, len(cu_sources)))) if is_cuda else 1

        def compile_one(src: str) -> str:
            obj = tmp / (Path(src).name + ".o")
            headers = [p for p in Path(src).parent.iterdir() if p.suffix in (".h", ".cuh")]
            headers += sorted(COMMON_DIR.glob("*.h"))  # okc_constants.h, shared by cpu and cuda
            deps = [Path(src), *headers]
            if obj.exists() and all(obj.stat().st_mtime >= d.stat().st_mtime for d in deps):
                return str(obj)
            if src.endswith(".cu"):
                cmd = [
                    nvcc,
                    "-c",
                    src,
                    "-o",
                    str(obj),
                    "-O3",
                    "-std=c++17",
                    "-Xcompiler",
                    "-fPIC",
                    "-Xcompiler",
                    "-fvisibility=hidden",
                    "--threads",
                    str(nvcc_threads),
                    *ext._gencode,
                    *[f"-I{d}" for d in ext.include_dirs],
                ]
                _log(" ".join(cmd))
                subprocess.run(cmd, check=True)
                return str(obj)
            objs = self.compiler.compile(
                [src],
                output_dir=str(tmp),
                include_dirs=ext.include_dirs,
                macros=ext.define_macros,
                extra_postargs=[
                    *self._cxx_flags,
                    *getattr(ext, "_isa_flags", []),
                    *ext.extra_compile_args,
                ],
                depends=[str(h) for h in headers],
            )
            # distutils names the object after the source path; move it where we expect it
            Path(objs[0]).replace(obj)
            return str(obj)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        self.compiler.link_shared_object(
            objects,
            str(ext_path),
            libraries=ext.libraries,
            library_dirs=ext.library_dirs,
            extra_postargs=[*([] if is_cuda else self._ld_flags), *ext.extra_link_args],
            target_lang="c++",
        )


#: ISA variants of the CPU module on x86-64: name -> compiler flags. One build holds them all;
#: backends/cpu.py chooses at import by CPU feature detection. x86-64-v3 = AVX2 + FMA
#: + BMI2 (Haswell / Zen 1 on), x86-64-v4 = AVX-512 F/BW/CD/DQ/VL (Skylake-SP / Zen 4 on).
X86_VARIANTS = {
    "base": [],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v4", "-mtune=generic"],
}


def _cpu_variants() -> list[tuple[str, list[str]]]:
    """The CPU module variants to build: ``[(isa, extra flags), ...]``."""
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64", "i686", "x86")
    known = dict(X86_VARIANTS) if x86 else {"base": []}
    spec = os.environ.get("OPTICAL_KERNELS_CPU_VARIANTS", "").strip()
    names = [v.strip() for v in spec.split(",") if v.strip()] if spec else list(known)
    unknown = [v for v in names if v not in known]
    if unknown:
        raise RuntimeError(
            f"OPTICAL_KERNELS_CPU_VARIANTS: unknown {unknown} on {machine}; known: {list(known)}"
        )
    out = [(v, known[v]) for v in names]
    if _flag("OPTICAL_KERNELS_NATIVE"):
        out.append(("native", ["-march=native"] if x86 else ["-mcpu=native"]))
    if _flag("OPTICAL_KERNELS_PORTABLE"):
        _log("OPTICAL_KERNELS_PORTABLE is no longer needed: every build is portable now")
    return out


def _extensions() -> list[Extension]:
    if _flag("OPTICAL_KERNELS_SKIP_CPU") and _flag("OPTICAL_KERNELS_SKIP_CUDA"):
        _log("OPTICAL_KERNELS_SKIP_CPU=1 and OPTICAL_KERNELS_SKIP_CUDA=1: pure-Python install")
        return []
    try:
        import pybind11
    except ImportError as exc:
        raise RuntimeError(
            "optical_kernels: pybind11>=2.12 is needed to build the native extensions "
            "(`pip install pybind11`, or build with isolation so pyproject's build requirements "
            "are installed); set OPTICAL_KERNELS_SKIP_CPU=1 OPTICAL_KERNELS_SKIP_CUDA=1 for a "
            "pure-Python install"
        ) from exc

    includes = [pybind11.get_include(), sysconfig.get_paths()["include"]]
    exts: list[Extension] = []
    if _flag("OPTICAL_KERNELS_SKIP_CPU"):
        _log("OPTICAL_KERNELS_SKIP_CPU=1: not building optical_kernels._cpu")
    elif (ROOT / CPU_DIR).is_dir():
        for isa, flags in _cpu_variants():
            ext = Extension(
                f"optical_kernels._cpu_{isa}",
                sources=_sources(CPU_DIR, (".cpp",)),
                include_dirs=[*includes, str(CPU_DIR), "csrc"],
                define_macros=[("OKC_MODULE", f"_cpu_{isa}"), ("OKC_ISA", f'"{isa}"')],
                language="c++",
            )
            ext._isa_flags = flags  # type: ignore[attr-defined]
            exts.append(ext)
    if _flag("OPTICAL_KERNELS_SKIP_CUDA"):
        _log("OPTICAL_KERNELS_SKIP_CUDA=1: not building optical_kernels._cuda")
        return exts
    cuda_sources = _sources(CUDA_DIR, (".cu", ".cpp")) if (ROOT / CUDA_DIR).is_dir() else []
    if not any(s.endswith(".cu") for s in cuda_sources):
        return exts
    nvcc = _find_nvcc()
    if nvcc is None:
        _log("nvcc not found: not building optical_kernels._cuda (set CUDA_HOME to enable)")
        return exts
    home = _cuda_home(nvcc)
    libdir = _cuda_libdir(home) if home else None
    if home is None or libdir is None:
        _log(f"nvcc at {nvcc} but no cuda_runtime.h / libcudart_static.a: skipping _cuda")
        return exts
    spec = os.environ.get("OPTICAL_KERNELS_CUDA_ARCHS", "80;90").replace(",", ";")
    archs = [a.strip() for a in spec.split(";") if a.strip()]
    gencode: list[str] = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    top = max(archs, key=lambda s: int("".join(ch for ch in s if ch.isdigit()) or 0))
    gencode += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    ext = Extension(
        "optical_kernels._cuda",
        sources=cuda_sources,
        include_dirs=[*includes, str(CUDA_DIR), "csrc", str(home / "include")],
        library_dirs=[str(libdir)],
        libraries=["cudart_static", "dl", "pthread", "rt"],
        language="c++",
    )
    ext._nvcc = nvcc  # type: ignore[attr-defined]
    ext._gencode = gencode  # type: ignore[attr-defined]
    _log(f"building optical_kernels._cuda with {nvcc} for sm_{', sm_'.join(archs)} + PTX {top}")
    exts.append(ext)
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})

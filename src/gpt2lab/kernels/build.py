"""Building ``kernels.c`` into a shared library, once per machine, and caching it.

The C file is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``; ``-O3
-fopenmp`` and the flags of one instruction-set path, :data:`ISA_FLAGS`) into
``$XDG_CACHE_HOME/gpt2lab/kernels/`` (about half a second a path), under a name that hashes the source,
the flags, the compiler and the CPU. A failed build is remembered next to where the library would be,
with the compiler's message, and not retried with the same compiler. A source whose interface departs
from :mod:`.abi`'s tables is not built at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import abi

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: the compiler fuses no multiply-add on its own, so every fused one is written out
# and the arithmetic of a row is the same in every code path (batch invariance, see kernels.c)
FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11")
# One library per instruction-set path, each the same source: AVX-512 (with VNNI) where the CPU has it,
# AVX2/FMA, and a portable build for any CPU (the compiler's baseline). "native" stands in for the first
# two where /proc/cpuinfo cannot say which the CPU has. kernels.c picks its code by the compiler's macros.
ISA_FLAGS = {"avx512": ("-march=native",), "avx2": ("-march=native", "-mno-avx512f"), "native": ("-march=native",),
             "portable": ()}
_ISA_NEEDS = {"avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, "avx2": {"avx2", "fma"}}


def cpu_isas() -> tuple[str, ...]:
    """The kernel paths this CPU runs, best first (keys of :data:`ISA_FLAGS`; always ends with "portable")."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return ("native", "portable")
    return (*(isa for isa, needs in _ISA_NEEDS.items() if needs <= set(flags)), "portable")


def cache_dir() -> Path:
    """Where built libraries are kept: ``$XDG_CACHE_HOME/gpt2lab/kernels`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2lab" / "kernels"


def compiler() -> str | None:
    """The C compiler's path: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``; None without one."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    """Source, flags, compiler and CPU: ``-march=native`` code must not run on another CPU sharing a home."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((compiler, str(os.stat(compiler).st_mtime_ns), *flags, platform.machine())).encode())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        cpu = sorted({line for line in cpuinfo if line.startswith(("flags", "model name"))})
        digest.update("\n".join(cpu).encode())
    except OSError:
        digest.update(platform.processor().encode())
    return digest.hexdigest()[:16]


def build(isa: str | None = None) -> Path | None:
    """The compiled library's path for instruction-set path ``isa`` (a key of :data:`ISA_FLAGS`; default
    the best of :func:`cpu_isas`), compiled now unless cached, or None where it cannot be built (no
    compiler, a build that failed now or before, a source that disagrees with :mod:`.abi`).
    Raises OSError for an unwritable cache folder, KeyError for an unknown ``isa``."""
    flags = FLAGS + ISA_FLAGS[isa or cpu_isas()[0]]
    cc = compiler()
    if cc is None:
        logger.debug("no C compiler found: gpt2lab's CPU kernels are off")
        return None
    target = cache_dir() / f"gpt2lab_kernels_{_build_key(cc, flags)}.so"
    failed = target.with_suffix(".failed")  # this compiler could not build this source: do not retry
    if target.is_file():
        return target
    if failed.is_file():
        logger.info("gpt2lab's CPU kernels are off: building them failed before (%s)", failed)
        return None
    mismatches = abi.differences(SOURCE.read_text(encoding="utf-8"))
    if mismatches:
        logger.warning("gpt2lab's CPU kernels are off: %s and kernels/abi.py disagree:\n%s", SOURCE,
                       "\n".join(mismatches))
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temporary name and rename: concurrent processes never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            failed.write_text(f"{cc} {' '.join(flags)}\n{result.stderr}", encoding="utf-8")
            logger.warning("building gpt2lab's CPU kernels failed (torch's kernels are used instead; the "
                           "reason is kept in %s):\n%s", failed, result.stderr.strip())
            return None
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

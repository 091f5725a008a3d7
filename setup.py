"""Build wiring for the optional C popcount extension (everything else is in pyproject.toml).

``rev_tasks.core._popcount`` makes Hamming distances ~10x faster than numpy (see
``bench/bench_hamming.py``). It is ``optional``: without a C compiler the install still
succeeds and ``rev_tasks.core.hamming`` falls back to numpy. ``-mpopcnt`` is added only when
the compiler accepts it *and* the build CPU has POPCNT, because the flag makes the compiler
emit an instruction that faults on a CPU without it; ``REV_PORTABLE_BUILD=1`` leaves it out
(for images built on one machine and run on an older one). Without the flag
``__builtin_popcountll`` is still exact, only slower.

When the compiler supports ``__attribute__((target("avx512vpopcntdq")))`` (GCC >= 8, Clang)
the AVX-512 kernel is compiled in as well (``REV_AVX512_POPCNT``); it needs no global flag and
is used only where the running CPU reports the feature, so it is safe on any x86-64.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def _cpu_has_popcnt() -> bool:
    """True only when we can tell that the build CPU executes POPCNT."""
    if platform.machine().lower() not in _X86:
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False  # not Linux: stay portable
    for line in text.splitlines():
        if line.startswith("flags"):
            return "popcnt" in line.split(":", 1)[1].split()
    return False


_POPCNT_PROBE = "int main(void) { return __builtin_popcountll(5ULL) - 2; }\n"
_AVX512_PROBE = """
#include <immintrin.h>
__attribute__((target("avx512f,avx512vpopcntdq")))
static long long f(const void *p) {
    return _mm512_reduce_add_epi64(_mm512_popcnt_epi64(_mm512_loadu_si512(p)));
}
int main(void) {
    static const char buf[64];
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vpopcntdq") ? (int)f(buf) : 0;
}
"""


def _compiles(compiler: object, code: str, flags: list[str]) -> bool:
    """Compile ``code`` with ``flags``; False on any compiler error."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text(code)
        try:
            compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - CompileError or a missing compiler: do without
            return False
    return True


class BuildExt(build_ext):
    """Chooses the optimisation flags at build time (see the module docstring)."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            flags = ["-O3"]
            portable = os.environ.get("REV_PORTABLE_BUILD", "") == "1"
            if (
                not portable
                and _cpu_has_popcnt()
                and _compiles(self.compiler, _POPCNT_PROBE, ["-mpopcnt"])
            ):
                flags.append("-mpopcnt")
            avx512 = platform.machine().lower() in _X86 and _compiles(
                self.compiler, _AVX512_PROBE, ["-O2"]
            )
            for ext in self.extensions:
                ext.extra_compile_args = [*ext.extra_compile_args, *flags]
                if avx512:
                    ext.define_macros = [*ext.define_macros, ("REV_AVX512_POPCNT", "1")]
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "rev_tasks.core._popcount",
            sources=["rev_tasks/core/_popcount.c"],
            optional=True,  # no compiler: install anyway, numpy fallback
        )
    ],
    cmdclass={"build_ext": BuildExt},
)

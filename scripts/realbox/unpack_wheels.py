"""Unpacks the server bundle's wheels into one site folder, leaving out what an H100 never
loads: sgl_kernel's Blackwell and FA3 builds (over 1 GB), deep_gemm, sglang's multimodal
generation and tests, and the kt-kernel variants other than AMX and AVX-512 (the GPU machine's
CPU is an AMX Xeon). Adds kt-kernel's native libraries from a second wheel and a stub of
`IPython.display`, which `sglang.utils` imports at module level.

Usage: unpack_wheels.py WHEEL_DIR KT_LIBS_WHEEL_DIR SITE_DIR
"""
from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

SKIP_PREFIXES = ("sgl_kernel/flash_ops", "sgl_kernel/sm100/", "sgl_kernel/flashmla_ops", "deep_gemm/", "lib/",
                 "_mscclpp", "sglang/multimodal_gen/", "sglang/test/")
KT_VARIANTS_KEPT = ("_amx.", "_avx512_bf16.")
NATIVE_LIBS = {"libnuma-": "libnuma.so.1", "libhwloc-": "libhwloc.so.15", "libgomp-": "libgomp.so.1"}
IPYTHON_DISPLAY_STUB = "class HTML:\n    def __init__(self, *a, **k): pass\n\n\ndef display(*a, **k): pass\n"


def kept(name: str) -> bool:
    if name.startswith(SKIP_PREFIXES):
        return False
    if name.startswith("kt_kernel/_kt_kernel_ext_"):
        return any(v in name for v in KT_VARIANTS_KEPT)
    return True


def unpack(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if kept(n)]
        z.extractall(site, names)
        # a wheel's <name>.data/{purelib,platlib} belong at the site's top level
        for data_dir in {n.split("/")[0] for n in names if n.split("/")[0].endswith(".data")}:
            for sub in ("purelib", "platlib"):
                part = site / data_dir / sub
                if part.is_dir():
                    shutil.copytree(part, site, dirs_exist_ok=True)
            shutil.rmtree(site / data_dir, ignore_errors=True)


def main(wheels: Path, kt_libs: Path, site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        unpack(wheel, site)
    libs = site / "_ktlibs"
    libs.mkdir(exist_ok=True)
    for wheel in kt_libs.glob("kt_kernel-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for n in z.namelist():
                base = n.rsplit("/", 1)[-1]
                for prefix, target in NATIVE_LIBS.items():
                    if n.startswith("kt_kernel.libs/") and base.startswith(prefix):
                        (libs / target).write_bytes(z.read(n))
    (site / "IPython").mkdir(exist_ok=True)
    (site / "IPython" / "__init__.py").write_text("")
    (site / "IPython" / "display.py").write_text(IPYTHON_DISPLAY_STUB)
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))

"""Build of fastlogits' Cython kernels.

Before anything is compiled, a trivial C program is built so that a missing compiler fails at once with a
message saying what to install. OpenMP is probed the same way (set FASTLOGITS_NO_OPENMP=1 to build without
it; ``fastlogits.show_config()`` reports what the build has); a change of compiler, flags or OpenMP
rebuilds every module. The shipped flags are portable: the C core picks AVX-512, AVX2 or baseline code at
run time (target_clones in fastlogits.h); nothing here uses native-architecture flags or flags that change
NaN/inf semantics.
"""
import os
import shlex
import shutil
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ["_reduce", "_maps", "_select", "_info", "_exports", "_sample", "_layout"]


def _env_link_flags():
    """CFLAGS and LDFLAGS from the environment. setuptools passes them where it links the extensions (its
    shared-library link line) but not where it links an executable, so a compile flag that needs its
    twin at link time (a sanitizer's, --coverage) would fail the probes alone: the probes link with them."""
    return shlex.split(os.environ.get("CFLAGS", "")) + shlex.split(os.environ.get("LDFLAGS", ""))


def _try_compile(compiler, source, extra_args=(), link_args=()):
    """None when the C source compiles and links, else why not (the compiler's error)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        try:
            objs = compiler.compile([path], output_dir=tmp, extra_postargs=list(extra_args))
            compiler.link_executable(objs, os.path.join(tmp, "probe"),
                                     extra_postargs=list(link_args) + _env_link_flags())
        except Exception as e:
            return str(e) or type(e).__name__
    return None


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:      # the modules compile independently: one job per core
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        cc = self.compiler
        why = _try_compile(cc, "int main(void) { return 0; }\n")
        if why is not None:
            name = getattr(cc, "compiler", ["cc"])[0]
            if shutil.which(name) is None:
                sys.exit(
                    "error: fastlogits needs a working C compiler to build its kernels, and none was found "
                    f"(tried {name!r}). Install one (Debian/Ubuntu: 'apt-get install gcc python3-dev'; "
                    "macOS: 'xcode-select --install') and retry."
                )
            sys.exit(f"error: the C compiler {name!r} could not build a trivial program with this "
                     f"environment's flags (CFLAGS={os.environ.get('CFLAGS', '')!r}, "
                     f"LDFLAGS={os.environ.get('LDFLAGS', '')!r}): {why}")
        omp_compile, omp_link = ["-fopenmp"], ["-fopenmp"]
        no_omp = os.environ.get("FASTLOGITS_NO_OPENMP", "").strip().lower()
        use_omp = no_omp in ("", "0", "false", "no", "off")
        if use_omp and _try_compile(
            cc, "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n",
            omp_compile, omp_link,
        ) is not None:
            print("warning: the C compiler has no OpenMP; fastlogits will run on one thread. "
                  "(Install libgomp / libomp to enable threads.)", file=sys.stderr)
            use_omp = False
        for ext in self.extensions:
            ext.extra_compile_args = ["-O3", "-std=gnu99"] + (omp_compile if use_omp else [])
            ext.extra_link_args = omp_link if use_omp else []
            ext.libraries = ["m"]
        # setuptools rebuilds a module only when a source is newer than it: a build with another compiler,
        # other CFLAGS or OpenMP switched off kept the last build's modules. The settings of the last
        # complete build are kept in a stamp file, and any change rebuilds every module.
        settings = repr((getattr(cc, "compiler_so", None), os.environ.get("CFLAGS", ""),
                         os.environ.get("LDFLAGS", ""), use_omp))
        stamp = os.path.join(self.build_temp, "fastlogits-build-settings.txt")
        try:
            with open(stamp) as f:
                self.force = self.force or f.read() != settings
        except OSError:
            self.force = True
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(settings)


def extensions():
    from Cython.Build import cythonize

    exts = [
        Extension(
            f"fastlogits.cpu.{name}",
            [f"fastlogits/cpu/{name}.pyx"],
            include_dirs=["fastlogits/include"],
            depends=["fastlogits/include/fastlogits.h", "fastlogits/include/fastlogits_impl.h",
                     "fastlogits/include/fastlogits_sample.h", "fastlogits/cpu/_rows.pxd",
                     "fastlogits/clib.pxd"],
        )
        for name in MODULES
    ]
    return cythonize(exts, compiler_directives={"language_level": 3}, include_path=["."])


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})

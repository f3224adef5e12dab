"""fairseq_accel: smaller and faster Transformer ASR and NMT as a fairseq plugin."""
import base64
import hashlib
import os
import zipfile
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

try:  # the CPU kernels build against the torch installed here (pip install --no-build-isolation)
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    BuildExtension = CppExtension = None

CONSOLE_SCRIPTS = [
    "fairseq-accel-prepare=fairseq_accel.cli.prepare:main",
    "fairseq-accel-profile=fairseq_accel.cli.profile:main",
    "fairseq-accel-trust-checkpoint=fairseq_accel.compat.checkpoint_trust:main",
    "fairseq-accel-benchmark=fairseq_accel.cli.benchmark:main",
    "fairseq-accel-benchmark-encoder=fairseq_accel.cli.benchmark_encoder:main",
    "fairseq-accel-average=fairseq_accel.cli.average:main",
    "fairseq-accel-compress=fairseq_accel.cli.compress:main",
]

# Startup hook (see fairseq_accel_startup.py): a .pth file in site-packages whose one line (Python
# runs .pth lines that start with "import") imports the stdlib-only module fairseq_accel_startup at
# interpreter start, so that stock fairseq CLIs load checkpoints under torch >= 2.6 even without
# --user-dir. Wheels install root-level files into site-packages: build_py adds the .pth to regular
# wheels, and since setuptools' PEP 660 editable wheel (pip install -e) only maps the packages, the
# .pth is added to that wheel and its RECORD (so pip uninstall removes it too). The line imports the
# module only if it can be found, so a deleted checkout behind an editable install stays silent.
STARTUP_PTH_NAME = "fairseq_accel_startup.pth"
STARTUP_PTH_TEXT = (
    b"import importlib.util; "
    b"importlib.util.find_spec('fairseq_accel_startup') and __import__('fairseq_accel_startup')\n"
)


class BuildPyWithStartupHook(build_py):
    """build_py that also writes the startup .pth at the root of the build (wheel) tree."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, STARTUP_PTH_NAME), "wb") as f:
            f.write(STARTUP_PTH_TEXT)

    def get_outputs(self, *args, **kwargs):
        return super().get_outputs(*args, **kwargs) + [os.path.join(self.build_lib, STARTUP_PTH_NAME)]


class EditableWheelWithStartupHook(editable_wheel):
    """editable_wheel that adds the startup .pth (with its RECORD line) to the built wheel."""

    def run(self):
        super().run()
        wheels = glob(os.path.join(self.dist_dir, "fairseq_accel-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one editable wheel in {self.dist_dir}, found {wheels}")
        add_file_to_wheel(wheels[0], STARTUP_PTH_NAME, STARTUP_PTH_TEXT)


def add_file_to_wheel(wheel, name, data):
    """Rewrite a wheel with one more root-level file, listed in its RECORD with hash and size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rewritten = wheel + ".tmp"
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                content = content.rstrip(b"\n") + f"\n{name},sha256={digest},{len(data)}\n".encode()
            target.writestr(item, content)
        target.writestr(name, data)
    os.replace(rewritten, wheel)


CPU_KERNELS = "fairseq_accel._cpu_kernels"
CPU_KERNELS_FALLBACK = "the fast generator uses its torch path instead (the same results, slower)"


def cpu_kernel_extensions():
    """The C++ CPU kernels of the fast generator (fairseq_accel/csrc), or none where torch is not installed."""
    if CppExtension is None:
        print(f"fairseq_accel: torch is not installed, so {CPU_KERNELS} is not built; {CPU_KERNELS_FALLBACK}")
        return []
    sources = sorted(glob("fairseq_accel/csrc/*.cpp"))
    if not sources:  # a source tree without them (the packaging tests build wheels that way)
        print(f"fairseq_accel: no C++ sources in fairseq_accel/csrc, so {CPU_KERNELS} is not built; "
              f"{CPU_KERNELS_FALLBACK}")
        return []
    return [CppExtension(CPU_KERNELS, sources,
                         depends=sorted(glob("fairseq_accel/csrc/*.h")),
                         # -fopenmp: at::parallel_for splits the kernels' loops between torch's threads only in
                         # code built with OpenMP (else it runs them serially); the extension takes the libgomp
                         # torch has loaded (same soname), so torch.set_num_threads sets its thread count
                         extra_compile_args=["-O3", "-fno-trapping-math", "-fopenmp"],
                         extra_link_args=["-fopenmp"])]


if BuildExtension is not None:
    class OptionalBuildExtension(BuildExtension):
        """torch's build_ext, but a machine without a C++ compiler still installs the plugin (one notice line);
        fairseq_accel.inference.cpu_kernels says the same when the generator starts, and CI's tests fail."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # no compiler, a failing compile: any of distutils' error classes
                print(f"fairseq_accel: {ext.name} was not built ({type(error).__name__}: {error}); "
                      f"{CPU_KERNELS_FALLBACK}")


setup(
    name="fairseq_accel",
    version="0.1.0",
    description="Lite Transformer (LSRA) and SAN-M models, compression and fast decoding for fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_accel", "fairseq_accel.*"]),
    py_modules=["fairseq_accel_startup"],
    cmdclass={"build_py": BuildPyWithStartupHook, "editable_wheel": EditableWheelWithStartupHook,
              **({"build_ext": OptionalBuildExtension} if BuildExtension is not None else {})},
    ext_modules=cpu_kernel_extensions(),
    # fairseq itself is deliberately not listed: on Python >= 3.11 it comes from the `ve-fairseq`
    # distribution (module `fairseq`), and naming `fairseq` would make pip fetch the official 0.12.2,
    # which does not import there. `fairseq_accel` checks for the module at import time instead.
    # torch is not listed either, so that installing the plugin never replaces the user's torch build.
    install_requires=[
        "numpy", "scipy", "sentencepiece", "sacrebleu", "pyyaml", "editdistance", "jiwer", "soundfile",
        "kaldi-native-fbank",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x", "nvidia-cuda-nvrtc-cu12"],
        "test": ["pytest", "pytest-timeout", "sacremoses"],
        "iwslt": ["sacremoses"],
        "bench": ["ctranslate2"],
    },
    package_data={"fairseq_accel": ["kernels/*.cu", "kernels/*.cuh", "csrc/*.h"]},
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)

"""Packaging promises: installing the plugin never pulls torch, fairseq or torchaudio; a missing fairseq
is reported with the install command; every console script answers --help."""
import importlib.metadata
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, cli_output, run_cli


def test_install_requires_leave_torch_and_fairseq_alone():
    names = {re.split(r"[ ;<>=!\[]", requirement, maxsplit=1)[0].lower()
             for requirement in importlib.metadata.requires("fairseq_accel") or []
             if "extra ==" not in requirement}
    assert names and not names & {"torch", "torchaudio", "fairseq", "ve-fairseq"}, names


def test_missing_fairseq_is_reported_with_the_install_command():
    code = "import sys; sys.modules['fairseq'] = None; import fairseq_accel.plugin"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode != 0
    assert "fairseq_accel needs fairseq" in result.stderr
    assert "pip install --no-deps ve-fairseq==0.12.3" in result.stderr


@pytest.mark.parametrize("command", ["fairseq-accel-prepare", "fairseq-accel-profile", "fairseq-accel-trust-checkpoint",
                                     "fairseq-accel-average", "fairseq-accel-benchmark", "fairseq-accel-benchmark-encoder",
                                     "fairseq-accel-compress"])
def test_console_scripts_answer_help(command):
    result = run_cli([command, "--help"])
    assert result.returncode == 0, cli_output(result)
    assert "usage:" in result.stdout

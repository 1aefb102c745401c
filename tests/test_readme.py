"""The README's commands work as written: every ``python code/...`` command line parses with the script it names,
and those that need no real data (the synthetic dataset and its training run) run, with tiny settings added."""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, device_env
from utils import cli

README = REPO_ROOT / "README.md"
# added to a README command that trains, so that it runs in seconds and writes only under the test's folder
TINY_RUN = ["--max_iterations", "2", "--n_filters", "4", "--progress", "0", "--num_workers", "0"]


def readme_commands():
    """Every command line of the README's ``bash`` blocks: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = "" if line.lstrip().startswith("#") else line.split(" #")[0].strip()
            if line:
                commands.append(line)
    return commands


def python_commands():
    """``(module, argv)`` of every ``python code/<path>.py ...`` command of the README; a script the README makes
    with ``cp code/<a>.py code/<b>.py`` ("Try an idea") is parsed as the script it copies."""
    found, copies = [], {}
    for command in readme_commands():
        words = shlex.split(command)
        if len(words) == 3 and words[0] == "cp" and all(w.startswith("code/") for w in words[1:]):
            copies[words[2]] = words[1]
        if len(words) > 1 and words[0] == "python" and words[1].startswith("code/") and words[1].endswith(".py"):
            script = copies.get(words[1], words[1])
            found.append((script[len("code/"):-len(".py")].replace("/", "."), words[2:]))
    return found


class _Parsed(Exception):
    """Raised by the patched parser once the flags are parsed: nothing else of the script runs."""


def test_the_readme_has_the_commands_we_test():
    modules = {module for module, _ in python_commands()}
    assert {"train_supervised_3D", "dataloaders.synthetic", "test_3D", "test_released", "gpu_check"} <= modules
    assert any("synthetic" in " ".join(argv) for module, argv in python_commands() if module.startswith("train_"))


@pytest.mark.parametrize("module, argv", python_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_python_command_parses(module, argv, monkeypatch):
    """The flags of every command exist, with values of the right type (a renamed or removed flag fails here); a
    flag that answers and exits (``--print_protocol``) exits with status 0."""
    original = cli.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises((_Parsed, SystemExit)) as stopped:
        __import__(module, fromlist=["main"]).main(argv)
    assert stopped.type is _Parsed or stopped.value.code == 0


def run_readme_command(argv, replacements, extra=()):
    """Run a README command (``argv`` after ``python``) with its paths replaced and ``extra`` flags appended."""
    argv = [replacements.get(word, word) for word in argv] + list(extra)
    proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=600, env=device_env("cpu"))
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_the_commands_without_real_data_run_as_written(tmp_path):
    """The synthetic dataset, then the README's training run on it (2 iterations, into the test's folder)."""
    synthetic = str(tmp_path / "synthetic_LA")
    replacements = {"data/synthetic_LA": synthetic}
    commands = [shlex.split(command)[1:] for command in readme_commands() if "synthetic" in command
                and command.startswith("python code/")]
    writer = [argv for argv in commands if argv[0] == "code/dataloaders/synthetic.py"]
    training = [argv for argv in commands if argv[0].startswith("code/train_")]
    assert len(writer) == 1 and training
    run_readme_command(writer[0], replacements)
    for argv in training:
        run_readme_command(argv, replacements, [*TINY_RUN, "--output_root", str(tmp_path / "model")])
    summaries = list((tmp_path / "model").glob("synthetic_LA/*/*/eval_iter_2/summary.json"))  # its data, not LA
    assert len(summaries) == len(training)

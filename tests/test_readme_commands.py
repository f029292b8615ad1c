"""Every command in README.md works exactly as written: the README's ```bash blocks are the commands, run in order in
a fresh copy of the repository's files, with the running interpreter's virtual environment (no new venv).

Marker convention (the README's quick start states it too): a command whose trailing comment carries `[GPU]`,
`[hub]` or `[network]` needs a CUDA GPU, the Hugging Face hub (directly, or through a model an earlier `[hub]` command
fetched) or a package download; it is skipped here with that reason. The few CPU commands this test leaves to
other tests are in COVERED_ELSEWHERE with the reason (and must still be in the README). Every other command must
exit 0; each runs after all the commands above it in the same copy, so what one writes (`out/tiny`,
`runs/tiny-stage1`) is there for the next. Afterwards the copy holds no new file that git would track: every output
lands in a git-ignored folder.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
TAGS = {
    "GPU": "marked [GPU] in the README: needs a CUDA GPU",
    "hub": "marked [hub] in the README: needs the Hugging Face hub (directly or through a model it fetched)",
    "network": "marked [network] in the README: downloads packages",
}
COVERED_ELSEWHERE = {
    "bash scripts/demo.sh": "the full demo takes about 5 minutes; tests/test_demo.py runs the same code "
                            "(`mlcd-vl demo --quick`) in CI",
    "bash scripts/test.sh": "the test suite this test belongs to (CI's .ci/run runs exactly this command)",
    "mlcd-vl study --tiny": "the CPU study takes about 25 minutes (three towers, quick plan); "
                            "tests/test_study.py runs the same command with two towers and fewer steps",
}
COMMAND_TIMEOUT_S = 420


@dataclass(frozen=True)
class Command:
    text: str  # the shell command, continuation lines joined, comment removed
    comment: str
    line: int  # where it starts in README.md

    @property
    def tags(self) -> set[str]:
        return set(re.findall(r"\[(\w+)\]", self.comment)) & set(TAGS)

    def skip_reason(self) -> str | None:
        if self.text in COVERED_ELSEWHERE:
            return COVERED_ELSEWHERE[self.text]
        return "; ".join(TAGS[tag] for tag in sorted(self.tags)) or None


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) at the first `#` outside quotes that starts a word, as bash reads it."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1:].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[Command]:
    commands, lines = [], text.splitlines()
    inside, pending, start = False, "", 0
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            inside = line.strip() == "```bash" if not inside else False
            continue
        if not inside or (not pending and not line.strip()):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        command, comment = split_comment(line.strip())
        if pending or command:
            commands.append(Command((pending + command).strip(), comment, start))
        pending = ""
    return commands


COMMANDS = readme_commands(README.read_text())


def test_readme_commands_are_runnable_or_tagged():
    """The parser sees every command, the tags are the known ones, and the exceptions still exist."""
    assert len(COMMANDS) >= 10
    texts = [command.text for command in COMMANDS]
    assert set(COVERED_ELSEWHERE) <= set(texts), "a COVERED_ELSEWHERE command left the README: update the test"
    runnable = [command for command in COMMANDS if command.skip_reason() is None]
    assert len(runnable) >= 3, runnable
    for command in COMMANDS:
        unknown = set(re.findall(r"\[(\w+)\]", command.comment)) - set(TAGS)
        assert not unknown, f"README.md:{command.line}: unknown tag(s) {sorted(unknown)}; known: {sorted(TAGS)}"
    continued = next(c for c in COMMANDS if c.text.startswith("mlcd-vl build --llm"))
    assert "--merge spatial_unpad out/mlcd-bigG-qwen7b-init" in continued.text and continued.tags == {"hub"}


def test_split_comment_keeps_quoted_hashes():
    assert split_comment('mlcd-vl ask "a # b" --x 1   # note [hub]') == ('mlcd-vl ask "a # b" --x 1', "note [hub]")
    assert split_comment("echo a#b") == ("echo a#b", "")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the working tree's files (tracked, plus new files git does not ignore), as a git repository
    with everything committed, so that `git status` shows what the commands leave behind."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.fail("the README test copies the repository's files with git (git ls-files); run it in a clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    root = tmp_path_factory.mktemp("readme") / "checkout"
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():  # tracked files deleted in the working tree are left out
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    git = ["git", "-c", "user.name=readme-test", "-c", "user.email=readme-test@localhost", "-c", "commit.gpgsign=false"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "README test checkout"]):
        subprocess.run(git + step, cwd=root, check=True, capture_output=True)
    return root


def _environment(root: Path) -> dict[str, str]:
    """The interpreter's venv first on PATH (`mlcd-vl`, `python`) and for the scripts; this copy's package first."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               MLCD_VL_VENV=sys.prefix, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(_free_port()),
               MLCD_VL_CACHE_DIR=str(root.parent / "data-cache"))  # the data cache, outside the copy
    env.pop("PYTHON", None)  # the scripts' interpreter comes from MLCD_VL_VENV
    return env


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"README:{c.line}" for c in COMMANDS])
def test_readme_command_runs_as_written(command: Command, checkout: Path):
    reason = command.skip_reason()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(["bash", "-c", command.text], cwd=checkout, env=_environment(checkout),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    output = (done.stdout[-3000:] + "\n" + done.stderr[-3000:]).strip()
    assert done.returncode == 0, f"README.md:{command.line}: `{command.text}` exited {done.returncode}:\n{output}"


@pytest.mark.slow
def test_readme_commands_leave_only_ignored_files(checkout: Path):
    """Runs after the commands above (file order): nothing they wrote would show up in `git status`."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=checkout,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"README commands left files git would track:\n{status[:2000]}"

"""A git ref checked out beside this repository, for a benchmark that runs cnnopt as it was there side by side with
cnnopt now (the folder goes first on the subprocess's PYTHONPATH)."""

import contextlib
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout(ref: str, folder: Path):
    """`ref` as a detached git worktree at `folder` for the block, removed after it however it ends."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref], check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], capture_output=True)

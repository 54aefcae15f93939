"""Where the tests find the repository and the shared data beside it (../shared/data: the eval sets
and the DeepScaleR train file, see its SOURCE.txt files)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

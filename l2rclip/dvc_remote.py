"""Whether this checkout can `dvc pull` the committed results, and what to set when it cannot.

`.dvc/config` names a default remote that is a folder beside the checkout: it exists where
`make demo` pushed, not in a fresh clone elsewhere. `dvc pull` there fails with DVC's "missing
cache files"; this module says the same thing in one line, with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dvc.config import ConfigError
from dvc.exceptions import NotDvcRepoError
from dvc.repo import Repo

SET_REMOTE = (
    "set a remote a clone can reach: `dvc remote add -d store s3://bucket/l2rclip` (or gs://, "
    "azure://, ssh://host/path, a shared folder; install the matching extra, e.g. pip install "
    "'dvc[s3]'), or `dvc remote modify --local local url <url>`; then `dvc push` where the "
    "results are and `dvc pull` here"
)


@dataclass(frozen=True)
class RemoteStatus:
    """The default DVC remote of a checkout: its name, URL and whether `dvc pull` can reach it."""

    name: str | None
    url: str | None
    usable: bool | None  # None: remote storage (s3://...) that is not probed here
    message: str


def remote_status(root: str | Path = ".") -> RemoteStatus:
    """Read the default remote from the checkout's DVC config; probe it only when it is a local folder."""
    try:
        with Repo(str(root)) as repo:
            config = repo.config
            name = config["core"].get("remote")
            url = config["remote"][name]["url"] if name else None
            dvc_dir = Path(repo.dvc_dir)
    except (NotDvcRepoError, ConfigError, KeyError) as error:
        return RemoteStatus(None, None, False, f"no usable DVC configuration in {root}: {error}")
    if not name or not url:
        return RemoteStatus(name, url, False, f"no default DVC remote is set: {SET_REMOTE}")
    scheme = urlparse(url).scheme
    if scheme and scheme != "file" and len(scheme) > 1:  # one letter: a Windows drive
        return RemoteStatus(name, url, None, f"default DVC remote {name!r} is {url} (not probed here)")
    folder = Path(url) if Path(url).is_absolute() else (dvc_dir / url).resolve()  # DVC resolves it already
    if not folder.is_dir():
        return RemoteStatus(
            name,
            url,
            False,
            f"default DVC remote {name!r} is the folder {folder}, which does not exist here, "
            f"so `dvc pull` cannot fetch the committed results (it exists only where "
            f"`make demo` pushed to it); {SET_REMOTE}",
        )
    return RemoteStatus(name, url, True, f"default DVC remote {name!r} is the folder {folder}")

"""A Hugging Face Hub cache folder built from local folders, as `hf download` would leave it.

  commit = add_repo(cache, "org/tiny-sd", sd_folder)                 # refs/main -> commit
  add_repo(cache, "org/tiny-sd", other_folder, revision="v2")        # a tag with other files
  with offline_cache(monkeypatch, cache): ...                        # HF_HUB_OFFLINE=1 in-process

The layout is huggingface_hub's: `models--ORG--NAME/blobs/<sha256>`, `snapshots/<commit>/<path>`
(relative symlinks to the blobs) and `refs/<revision>` holding the commit.
"""

import contextlib
import hashlib
import os
import shutil


def repo_folder(cache: str, repo_id: str) -> str:
  return os.path.join(cache, "models--" + repo_id.replace("/", "--"))


def add_repo(cache: str, repo_id: str, folder: str, *, revision: str = "main",
             skip: tuple[str, ...] = ()) -> str:
  """Caches every file of `folder` (but the paths in `skip`) as one commit of `repo_id`,
  pointed at by `revision`; returns the commit hash."""
  storage = repo_folder(cache, repo_id)
  paths = sorted(os.path.relpath(os.path.join(root, name), folder)
                 for root, _, names in os.walk(folder) for name in names)
  paths = [p for p in paths if p not in skip]
  commit = hashlib.sha1((repo_id + revision + "\n".join(paths)).encode()).hexdigest()
  for path in paths:
    with open(os.path.join(folder, path), "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    blob = os.path.join(storage, "blobs", digest)
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    if not os.path.exists(blob):
      shutil.copyfile(os.path.join(folder, path), blob)
    link = os.path.join(storage, "snapshots", commit, path)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
  with open(os.path.join(storage, "refs", revision), "w") as f:
    f.write(commit)
  return commit


@contextlib.contextmanager
def offline_cache(monkeypatch, cache: str):
  """huggingface_hub in this process reads `cache`, offline (it reads its environment once,
  at import, so the constants are patched)."""
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  with monkeypatch.context() as patch:
    patch.setattr(constants, "HF_HUB_CACHE", cache)
    patch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield


def env(cache: str) -> dict[str, str]:
  """The environment that makes a child process read `cache`, offline."""
  return {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
